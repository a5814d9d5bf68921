"""serving: the weights a run publishes for inference and when its model was first asked for,
completions recorded from served traffic, and the inference workers that serve models

Revision ID: 0014
Revises: 0013
Create Date: 2026-12-02
"""

import sqlalchemy as sa
from alembic import op

revision = "0014"
down_revision = "0013"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("runs", schema=None) as batch_op:
        batch_op.add_column(sa.Column("weights_step", sa.Integer(), nullable=True))
        batch_op.add_column(sa.Column("weights_path", sa.String(length=1024), nullable=True))
        batch_op.add_column(
            sa.Column("serving_asked_at", sa.DateTime(timezone=True), nullable=True)
        )
    op.create_table(
        "completions",
        sa.Column("id", sa.String(length=40), primary_key=True),
        sa.Column("project_id", sa.String(length=40), sa.ForeignKey("projects.id"), nullable=False),
        sa.Column("run_id", sa.String(length=40), sa.ForeignKey("runs.id"), nullable=True),
        sa.Column("model", sa.String(length=64), nullable=False),
        sa.Column("episode", sa.String(length=200), nullable=False),
        sa.Column("weights_step", sa.Integer(), nullable=True),
        sa.Column("prompt_ids", sa.JSON(), nullable=False),
        sa.Column("token_ids", sa.JSON(), nullable=False),
        sa.Column("text", sa.Text(), nullable=False),
        sa.Column("finish_reason", sa.String(length=32), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
    )
    op.create_index("ix_completions_project_id", "completions", ["project_id"])
    op.create_index("ix_completions_run_id", "completions", ["run_id"])
    op.create_table(
        "inference_workers",
        sa.Column("id", sa.String(length=64), primary_key=True),
        sa.Column("url", sa.String(length=512), nullable=False),
        sa.Column("models", sa.JSON(), nullable=False),
        sa.Column("memory_bytes", sa.BigInteger(), nullable=False),
        sa.Column("started_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("heartbeat_at", sa.DateTime(timezone=True), nullable=False),
    )


def downgrade() -> None:
    op.drop_table("inference_workers")
    op.drop_index("ix_completions_run_id", "completions")
    op.drop_index("ix_completions_project_id", "completions")
    op.drop_table("completions")
    with op.batch_alter_table("runs", schema=None) as batch_op:
        batch_op.drop_column("serving_asked_at")
        batch_op.drop_column("weights_path")
        batch_op.drop_column("weights_step")
