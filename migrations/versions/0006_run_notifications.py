"""run notifications outbox (notify_url)

Revision ID: 0006
Revises: 0005
Create Date: 2026-11-25

Existing runs get notify_state NULL: they had no notify_url, so there is nothing to send.
"""

import sqlalchemy as sa
from alembic import op

import service.models.base

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("runs", schema=None) as batch_op:
        batch_op.add_column(sa.Column("notify_state", sa.String(length=16), nullable=True))
        batch_op.add_column(
            sa.Column("notify_attempts", sa.Integer(), server_default="0", nullable=False)
        )
        batch_op.add_column(
            sa.Column(
                "notify_due_at", service.models.base.UTCDateTime(timezone=True), nullable=True
            )
        )
        batch_op.create_index(batch_op.f("ix_runs_notify_state"), ["notify_state"], unique=False)


def downgrade() -> None:
    with op.batch_alter_table("runs", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_runs_notify_state"))
        batch_op.drop_column("notify_due_at")
        batch_op.drop_column("notify_attempts")
        batch_op.drop_column("notify_state")
