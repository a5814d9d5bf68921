"""metric pages: each rollup bucket's extremes packed PAGE buckets to a row, which a chart reads
instead of the rollups (built here for the rollups already recorded)

Revision ID: 0020
Revises: 0019
Create Date: 2026-12-04
"""

import sqlalchemy as sa
from alembic import op
from sqlalchemy.orm import Session

revision = "0020"
down_revision = "0019"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "metric_pages",
        sa.Column("run_id", sa.String(length=40), sa.ForeignKey("runs.id"), primary_key=True),
        sa.Column("level", sa.Integer(), primary_key=True),
        sa.Column("name", sa.String(length=128), primary_key=True),
        sa.Column("page", sa.Integer(), primary_key=True),
        sa.Column("step_data", sa.LargeBinary(), nullable=False),
        sa.Column("value_data", sa.LargeBinary(), nullable=False),
        sa.Column("time_data", sa.LargeBinary(), nullable=False),
    )
    from service.models.metric import rebuild_pages

    session = Session(bind=op.get_bind())
    for (run_id,) in session.execute(sa.text("SELECT DISTINCT run_id FROM metric_rollups")).all():
        rebuild_pages(session, run_id)
    session.flush()


def downgrade() -> None:
    op.drop_table("metric_pages")
