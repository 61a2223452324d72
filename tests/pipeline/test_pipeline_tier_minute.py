"""429 storms from a per-minute limit the client does not know, in each Retry-After form.

The runs start in the background when collection selects this file (``minute_storm.py``);
the file name sorts last so they overlap the rest of the folder.
"""

from __future__ import annotations

import pytest
from minute_storm import FORMS, ROWS, SERVER_PER_MINUTE, WAIT_S, MinuteStorm
from pipeline_helpers import check_output, statuses


@pytest.mark.slow
@pytest.mark.parametrize("form", FORMS)
def test_unknown_per_minute_limit_is_honoured(form: str, minute_storm: MinuteStorm) -> None:
    minute_storm.thread.join(timeout=WAIT_S + 10)
    assert not minute_storm.thread.is_alive(), "the runs did not finish: a submit livelock"
    result = minute_storm.results[form]
    if result.error is not None:
        raise result.error
    assert result.summary is not None
    table = check_output(result.out, ROWS, result.summary)
    assert statuses(table) == {"succeeded": ROWS}
    stats = result.stats
    assert stats["submits_accepted"] == ROWS
    assert stats["duplicate_submits"] == 0
    assert stats["max_active"] <= 2
    assert stats["rate_limited"] > 0
    assert result.summary.rate_limited == stats["rate_limited"]
    # Acknowledgements in any sliding minute: never more than the server's limit.
    acked = sorted(table["submitted_at"].dt.epoch("ms").to_list())
    for first, later in zip(acked, acked[SERVER_PER_MINUTE:], strict=False):
        assert later - first >= 59_000
