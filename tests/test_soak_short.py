"""A short soak in `make test`: ~20 s of mixed traffic, then 5,000 concurrent connections.

The full soak (`make soak`, 10 minutes) holds RSS growth to 10 MB after warm-up; 20 s is too
short to tell warm-up from growth, so this run bounds it loosely and checks everything else
exactly: no error on a good connection, every rejection counted, fds back to baseline, no
worker restart, 5,000 proxied connections open at once.
"""

from __future__ import annotations

from .soak import run


def test_short_soak_and_5000_concurrent_connections() -> None:
    result = run(minutes=0.35, concurrent=5000, rss_growth_mb=40.0)
    print(result.summary)
    for k, v in result.figures.items():
        print(f"[figure] {k}: {v}")
    assert not result.failures, "\n".join(result.failures) + "\n" + result.summary
