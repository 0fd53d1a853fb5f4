"""The Flower ServerApp: hands the run to :func:`fedmte.server.job_runner.serve`.

The job arrives as the run config's ``job`` (JSON of
:class:`~fedmte.server.job_runner.ServerJob`); rounds go out as ``query.describe`` and
``query.stats`` messages through :class:`~fedmte.server.flower_exchange.FlowerExchange`.
"""

from __future__ import annotations

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from fedmte.server.job_runner import serve

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    """Run one fedmte scoring job."""
    serve(grid, dict(context.run_config), context.run_id)
