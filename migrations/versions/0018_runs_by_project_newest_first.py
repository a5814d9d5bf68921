"""runs: one index on (project_id, id) in place of the one on project_id, so that a page of a
project's runs (newest first, after a cursor) is read in index order however many runs it has

Revision ID: 0018
Revises: 0017
Create Date: 2026-12-03
"""

from alembic import op

revision = "0018"
down_revision = "0017"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_index("ix_runs_project_id_id", "runs", ["project_id", "id"])
    op.drop_index("ix_runs_project_id", "runs")


def downgrade() -> None:
    op.create_index("ix_runs_project_id", "runs", ["project_id"])
    op.drop_index("ix_runs_project_id_id", "runs")
