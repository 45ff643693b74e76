"""``fastwan serve``: an HTTP API over :class:`~fastwan.pipeline.VideoGenerator` with a
durable job queue.

* :mod:`fastwan.serve.schemas`: request and response bodies (pydantic, strict, bounded);
* :mod:`fastwan.serve.store`: the jobs table (SQLite) and the videos folder of a state dir;
* :mod:`fastwan.serve.worker`: device groups and the worker threads, one generator each;
* :mod:`fastwan.serve.runtime`: store + workers + expiry, request checks, health, metrics;
* :mod:`fastwan.serve.app`: the FastAPI routes, auth, and running uvicorn (:class:`Server`).

Nothing is imported here: ``import fastwan.serve.store`` needs neither torch nor FastAPI.
"""
