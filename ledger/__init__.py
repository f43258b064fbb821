"""The ledger: who may ask, how much, and what was asked. Keys, the rate limit, the request log, idempotency, the
usage rollups and what /v1/usage reads from them, and the database threads that write and read them.

It may import operations/, db.py and settings.py; nothing of the HTTP edge or the engine.

    keys.py           API keys: made, stored as SHA-256, checked on every /v1 request (CurrentKey)
    ratelimit.py      the per-key sliding window: the rule, and its stores (SQLite/PostgreSQL, Redis)
    idempotency.py    an Idempotency-Key's claim, and its stored answer replayed to repeats
    request_log.py    every /v1 request's row, committed before its answer starts
    writer.py         the database thread: the request path's writes (admissions, rows, rollups) in groups
    rollups.py        each log row counted into its key's minute, hour and day
    usage.py          /v1/usage: read from the rollups, and its answer's shape
    reader.py         the threads that read for /v1/usage
    backfill.py       a log from before the rollups, counted into them while serving
    retention.py      old rows and rollups deleted, a small batch at a time
    database_file.py  the SQLite file guard: is the file written still the one at DATABASE_URL?
"""
