"""metrics at scale: each value's time, per-series rollups for downsampled reads (built here
for the values already recorded), and each sample's GVPO weight and log-ratio

Revision ID: 0017
Revises: 0016
Create Date: 2026-12-03
"""

import sqlalchemy as sa
from alembic import op
from sqlalchemy.orm import Session

revision = "0017"
down_revision = "0016"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("metrics") as batch:
        batch.add_column(sa.Column("time", sa.Double(), nullable=True))
    with op.batch_alter_table("samples") as batch:
        batch.add_column(sa.Column("weight", sa.Double(), nullable=True))
        batch.add_column(sa.Column("logratio", sa.Double(), nullable=True))
    op.create_table(
        "metric_rollups",
        sa.Column("run_id", sa.String(length=40), sa.ForeignKey("runs.id"), primary_key=True),
        sa.Column("level", sa.Integer(), primary_key=True),
        sa.Column("name", sa.String(length=128), primary_key=True),
        sa.Column("bucket", sa.Integer(), primary_key=True),
        sa.Column("count", sa.Integer(), nullable=False),
        sa.Column("first_step", sa.Integer(), nullable=False),
        sa.Column("last_step", sa.Integer(), nullable=False),
        sa.Column("min_step", sa.Integer(), nullable=False),
        sa.Column("min_value", sa.Double(), nullable=False),
        sa.Column("min_time", sa.Double(), nullable=True),
        sa.Column("max_step", sa.Integer(), nullable=False),
        sa.Column("max_value", sa.Double(), nullable=False),
        sa.Column("max_time", sa.Double(), nullable=True),
    )
    from service.models.metric import rebuild_rollups

    session = Session(bind=op.get_bind())
    for (run_id,) in session.execute(sa.text("SELECT DISTINCT run_id FROM metrics")).all():
        rebuild_rollups(session, run_id)
    session.flush()


def downgrade() -> None:
    op.drop_table("metric_rollups")
    with op.batch_alter_table("samples") as batch:
        batch.drop_column("logratio")
        batch.drop_column("weight")
    with op.batch_alter_table("metrics") as batch:
        batch.drop_column("time")
