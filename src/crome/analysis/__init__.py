"""Analysis: why edits collapse (``analyze``), where facts live (``trace``), one HTML page
(``html_report``)."""
