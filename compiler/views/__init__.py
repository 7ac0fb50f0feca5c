"""Views: every human rendering (plan.md, diffs, data reports, token tables); none prints."""
