"""Progress lines: rates that stay readable for slow loops."""
from __future__ import annotations

from softcache.progress import rate


def test_a_rate_below_one_a_second_is_given_as_seconds_each():
    assert rate(1234, 1.0, "images") == "1,234 images/s"
    assert rate(2, 25.0, "batch") == "12.5 s/batch"       # not "0 batch/s"
    assert rate(3, 6.0, "samples") == "2.0 s/sample"
    assert rate(0, 5.0, "batch") == rate(5, 0.0, "batch") == "- batch/s"
