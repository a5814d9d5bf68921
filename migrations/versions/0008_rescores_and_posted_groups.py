"""rescores, reward history, posted groups

Revision ID: 0008
Revises: 0007
Create Date: 2026-11-30

rescores: re-scoring a run's stored samples with another reward; reward_history: the rewards a
re-scoring replaced; run_groups: groups posted to a running run for its off-policy slots.
"""

import sqlalchemy as sa
from alembic import op

import service.models.base

revision = "0008"
down_revision = "0007"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "rescores",
        sa.Column("id", sa.String(length=40), nullable=False),
        sa.Column("run_id", sa.String(length=40), nullable=False),
        sa.Column("number", sa.Integer(), nullable=False),
        sa.Column("reward", sa.JSON(), nullable=False),
        sa.Column("status", sa.String(length=16), nullable=False),
        sa.Column("samples_total", sa.Integer(), nullable=False),
        sa.Column("samples_scored", sa.Integer(), nullable=False),
        sa.Column("last_step", sa.Integer(), nullable=False),
        sa.Column("reward_mean_before", sa.Double(), nullable=True),
        sa.Column("reward_mean_after", sa.Double(), nullable=True),
        sa.Column("file_id", sa.String(length=40), nullable=True),
        sa.Column("error", sa.Text(), nullable=True),
        sa.Column("lease_owner", sa.String(length=200), nullable=True),
        sa.Column(
            "lease_expires_at", service.models.base.UTCDateTime(timezone=True), nullable=True
        ),
        sa.Column("created_at", service.models.base.UTCDateTime(timezone=True), nullable=False),
        sa.Column("dispatched_at", service.models.base.UTCDateTime(timezone=True), nullable=True),
        sa.Column("started_at", service.models.base.UTCDateTime(timezone=True), nullable=True),
        sa.Column("finished_at", service.models.base.UTCDateTime(timezone=True), nullable=True),
        sa.ForeignKeyConstraint(
            ["run_id"],
            ["runs.id"],
        ),
        sa.PrimaryKeyConstraint("id"),
    )
    with op.batch_alter_table("rescores", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_rescores_run_id"), ["run_id"], unique=False)
        batch_op.create_index(batch_op.f("ix_rescores_status"), ["status"], unique=False)

    op.create_table(
        "run_groups",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("run_id", sa.String(length=40), nullable=False),
        sa.Column("body", sa.JSON(), nullable=False),
        sa.Column("created_at", service.models.base.UTCDateTime(timezone=True), nullable=False),
        sa.Column("taken_step", sa.Integer(), nullable=True),
        sa.ForeignKeyConstraint(
            ["run_id"],
            ["runs.id"],
        ),
        sa.PrimaryKeyConstraint("id"),
    )
    with op.batch_alter_table("run_groups", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_run_groups_run_id"), ["run_id"], unique=False)

    op.create_table(
        "reward_history",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("sample_id", sa.Integer(), nullable=False),
        sa.Column("rescore_id", sa.String(length=40), nullable=False),
        sa.Column("reward", sa.Double(), nullable=False),
        sa.Column("replaced_at", service.models.base.UTCDateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(
            ["rescore_id"],
            ["rescores.id"],
        ),
        sa.ForeignKeyConstraint(
            ["sample_id"],
            ["samples.id"],
        ),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("sample_id", "rescore_id"),
    )
    with op.batch_alter_table("reward_history", schema=None) as batch_op:
        batch_op.create_index(
            batch_op.f("ix_reward_history_sample_id"), ["sample_id"], unique=False
        )


def downgrade() -> None:
    with op.batch_alter_table("reward_history", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_reward_history_sample_id"))

    op.drop_table("reward_history")
    with op.batch_alter_table("run_groups", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_run_groups_run_id"))

    op.drop_table("run_groups")
    with op.batch_alter_table("rescores", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_rescores_status"))
        batch_op.drop_index(batch_op.f("ix_rescores_run_id"))

    op.drop_table("rescores")
