"""Log lines go to the stderr of the moment, never to a stream that was closed since."""

from __future__ import annotations

import io
import json
import sys

from ldct_node.logs import configure_logging, get_logger, one_line


def test_log_lines_follow_stderr_swapped_after_configuration(monkeypatch):
    first = io.StringIO()
    monkeypatch.setattr(sys, "stderr", first)
    configure_logging(fmt="json")
    first.close()
    second = io.StringIO()
    monkeypatch.setattr(sys, "stderr", second)
    get_logger("test").info("still heard", series="1.2.3")
    line = json.loads(second.getvalue().strip())
    assert line["event"] == "still heard" and line["series"] == "1.2.3"


def test_one_line_joins_a_multiline_message_with_its_type():
    assert one_line(ValueError("bad\n  value")) == "ValueError: bad value"
