"""Usage, quotas and cost estimates: GET /v1/usage, GET /v1/runs/{id}/usage and
POST /v1/runs:estimate."""
