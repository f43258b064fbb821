"""Operations: what running the server needs whatever the request: its errors' one shape, request ids, the log,
the metrics, start-up failures said in one line, graceful shutdown, and the threads' names.

It may import settings.py only; every other package may import it.

    request_ids.py           X-Request-ID on every answer, and the id on every log line
    errors.py                the one error body, and the handlers that make every failure into it
    logs.py                  text or JSON lines, each with its request's id; summaries of floods
    metrics.py               Prometheus metrics and GET /metrics (multiprocess under --workers)
    configuration_errors.py  a setting the server cannot run with: one line, exit status 3
    shutdown.py              SIGTERM and Ctrl-C: the deadline admitted requests are answered by
    threads.py               the threads' names as the OS shows them, and the model's lower priority
"""
