"""quotas and usage: a project's own quota, each run's queue, priority and devices (from its
spec) and why its quota holds it back, when a worker last took it, what each attempt of a run
used per day, and what inference served of each run per day

Revision ID: 0019
Revises: 0018
Create Date: 2026-12-03
"""

import json

import sqlalchemy as sa
from alembic import op

revision = "0019"
down_revision = "0018"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("projects", schema=None) as batch_op:
        batch_op.add_column(sa.Column("max_concurrent_runs", sa.Integer(), nullable=True))
        batch_op.add_column(sa.Column("max_gpus", sa.Integer(), nullable=True))
        batch_op.add_column(sa.Column("gpu_hours", sa.Double(), nullable=True))
        batch_op.add_column(sa.Column("scheduled_at", sa.DateTime(timezone=True), nullable=True))
    with op.batch_alter_table("runs", schema=None) as batch_op:
        batch_op.add_column(
            sa.Column("queue", sa.String(length=200), nullable=False, server_default="default")
        )
        batch_op.add_column(sa.Column("priority", sa.Integer(), nullable=False, server_default="0"))
        batch_op.add_column(sa.Column("devices", sa.Integer(), nullable=False, server_default="1"))
        batch_op.add_column(sa.Column("waiting_reason", sa.Text(), nullable=True))
        batch_op.add_column(sa.Column("claimed_at", sa.DateTime(timezone=True), nullable=True))
    _fill_from_specs()
    op.create_index("ix_runs_queue_status", "runs", ["queue", "status"])
    op.create_index("ix_runs_dispatch_id", "runs", ["dispatch_id"])
    op.create_table(
        "usage",
        sa.Column("run_id", sa.String(length=40), sa.ForeignKey("runs.id"), primary_key=True),
        sa.Column("attempt", sa.Integer(), primary_key=True),
        sa.Column("day", sa.Date(), primary_key=True),
        sa.Column("project_id", sa.String(length=40), sa.ForeignKey("projects.id"), nullable=False),
        sa.Column("device", sa.String(length=8), nullable=False),
        sa.Column("device_seconds", sa.Double(), nullable=False),
        sa.Column("tokens_generated", sa.BigInteger(), nullable=False),
        sa.Column("tokens_trained", sa.BigInteger(), nullable=False),
        sa.Column("reward_calls", sa.Integer(), nullable=False),
        sa.Column("environment_calls", sa.Integer(), nullable=False),
    )
    op.create_index("ix_usage_project_id_day", "usage", ["project_id", "day"])
    op.create_table(
        "inference_usage",
        sa.Column(
            "project_id", sa.String(length=40), sa.ForeignKey("projects.id"), primary_key=True
        ),
        sa.Column("run_id", sa.String(length=40), sa.ForeignKey("runs.id"), primary_key=True),
        sa.Column("day", sa.Date(), primary_key=True),
        sa.Column("requests", sa.BigInteger(), nullable=False),
        sa.Column("prompt_tokens", sa.BigInteger(), nullable=False),
        sa.Column("completion_tokens", sa.BigInteger(), nullable=False),
    )
    op.create_index("ix_inference_usage_project_id_day", "inference_usage", ["project_id", "day"])


def _fill_from_specs() -> None:
    """The runs recorded before: queue, priority and devices as their stored specs say."""
    bind = op.get_bind()
    runs = sa.table(
        "runs",
        sa.column("id", sa.String),
        sa.column("spec", sa.JSON),
        sa.column("queue", sa.String),
        sa.column("priority", sa.Integer),
        sa.column("devices", sa.Integer),
    )
    for run_id, spec in bind.execute(sa.select(runs.c.id, runs.c.spec)).all():
        if isinstance(spec, str):
            spec = json.loads(spec)
        resources = (spec or {}).get("resources") or {}
        gpus = resources.get("gpus") or 0
        bind.execute(
            runs.update()
            .where(runs.c.id == run_id)
            .values(
                queue=resources.get("queue") or "default",
                priority=resources.get("priority") or 0,
                devices=resources.get("processes") or max(gpus, 1),
            )
        )


def downgrade() -> None:
    op.drop_index("ix_inference_usage_project_id_day", "inference_usage")
    op.drop_table("inference_usage")
    op.drop_index("ix_usage_project_id_day", "usage")
    op.drop_table("usage")
    op.drop_index("ix_runs_dispatch_id", "runs")
    op.drop_index("ix_runs_queue_status", "runs")
    with op.batch_alter_table("runs", schema=None) as batch_op:
        for column in ("claimed_at", "waiting_reason", "devices", "priority", "queue"):
            batch_op.drop_column(column)
    with op.batch_alter_table("projects", schema=None) as batch_op:
        for column in ("scheduled_at", "gpu_hours", "max_gpus", "max_concurrent_runs"):
            batch_op.drop_column(column)
