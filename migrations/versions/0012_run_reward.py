"""run reward: the mean reward of a run's last recorded step, kept on the run for listings

Revision ID: 0012
Revises: 0011
Create Date: 2026-12-02
"""

import sqlalchemy as sa
from alembic import op

revision = "0012"
down_revision = "0011"
branch_labels = None
depends_on = None

REWARD_MEAN = "reward/mean"  # the metric's name as workers record it at this revision


def upgrade() -> None:
    with op.batch_alter_table("runs", schema=None) as batch_op:
        batch_op.add_column(sa.Column("reward", sa.Double(), nullable=True))
    # A run recorded before: its last step's reward/mean, where it has one.
    runs = sa.table("runs", sa.column("id"), sa.column("step"), sa.column("reward"))
    metrics = sa.table(
        "metrics", sa.column("run_id"), sa.column("name"), sa.column("step"), sa.column("value")
    )
    last = (
        sa.select(metrics.c.value)
        .where(
            metrics.c.run_id == runs.c.id,
            metrics.c.name == REWARD_MEAN,
            metrics.c.step == runs.c.step,
        )
        .scalar_subquery()
    )
    op.execute(runs.update().values(reward=last))


def downgrade() -> None:
    with op.batch_alter_table("runs", schema=None) as batch_op:
        batch_op.drop_column("reward")
