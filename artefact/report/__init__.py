"""A finished sweep's report: the leaderboard, the trials' summaries and the figures. No Ray."""
