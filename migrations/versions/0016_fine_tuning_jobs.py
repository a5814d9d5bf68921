"""fine-tuning jobs: OpenAI-style jobs, each backed by a run, with what the job's body said that
a run spec does not hold

Revision ID: 0016
Revises: 0015
Create Date: 2026-12-03
"""

import sqlalchemy as sa
from alembic import op

revision = "0016"
down_revision = "0015"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "fine_tuning_jobs",
        sa.Column("id", sa.String(length=40), primary_key=True),
        sa.Column("project_id", sa.String(length=40), sa.ForeignKey("projects.id"), nullable=False),
        sa.Column("run_id", sa.String(length=40), sa.ForeignKey("runs.id"), nullable=False),
        sa.Column("model", sa.String(length=4096), nullable=False),
        sa.Column("training_file", sa.String(length=64), nullable=False),
        sa.Column("validation_file", sa.String(length=64), nullable=True),
        sa.Column("suffix", sa.String(length=64), nullable=True),
        sa.Column("seed", sa.Integer(), nullable=False),
        sa.Column("job_metadata", sa.JSON(), nullable=True),
        sa.Column("method", sa.JSON(), nullable=False),
        sa.Column("hyperparameters", sa.JSON(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.UniqueConstraint("run_id"),
    )
    op.create_index("ix_fine_tuning_jobs_project_id", "fine_tuning_jobs", ["project_id"])


def downgrade() -> None:
    op.drop_index("ix_fine_tuning_jobs_project_id", "fine_tuning_jobs")
    op.drop_table("fine_tuning_jobs")
