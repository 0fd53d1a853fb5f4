"""The Flower ServerApp: hands the run to :func:`fedmte.server.coordinator.serve_job`.

The job arrives as the run config's ``job`` (JSON of
:class:`~fedmte.server.coordinator.ServerJob`); its messages go out through
:class:`~fedmte.server.flower_exchange.FlowerExchange`.
"""

from __future__ import annotations

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from fedmte.protocol.errors import InvalidInputError
from fedmte.server.coordinator import serve_job

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    """Run one fedmte job."""
    text = context.run_config.get("job")
    if not isinstance(text, str):
        raise InvalidInputError("the run config has no 'job'; submit fedmte jobs with `fedmte run JOB.toml`")
    serve_job(grid, text, context.run_id)
