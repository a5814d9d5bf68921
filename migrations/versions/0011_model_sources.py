"""model sources: registered base models, and each run's authorised model folders kept off its spec

Revision ID: 0011
Revises: 0010
Create Date: 2026-12-02
"""

import json

import sqlalchemy as sa
from alembic import op

revision = "0011"
down_revision = "0010"
branch_labels = None
depends_on = None

FIELDS = ("path", "adapter")
RUNS = sa.table(
    "runs", sa.column("id"), sa.column("spec", sa.JSON), sa.column("model_source", sa.JSON)
)


def upgrade() -> None:
    op.create_table(
        "registered_models",
        sa.Column("name", sa.String(100), primary_key=True),
        sa.Column("path", sa.String(4096), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
    )
    with op.batch_alter_table("runs", schema=None) as batch_op:
        batch_op.add_column(sa.Column("model_source", sa.JSON(), nullable=True))
    # Every run's model folders move to model_source, where its worker reads them (and checks
    # them again before loading); a run started from a checkpoint keeps none in its spec.
    conn = op.get_bind()
    runs = RUNS
    for run_id, spec in conn.execute(sa.select(runs.c.id, runs.c.spec)).all():
        spec = json.loads(spec) if isinstance(spec, str) else spec
        model = dict(spec.get("model") or {})
        source = {name: model.get(name) for name in FIELDS}
        if model.get("checkpoint"):
            model.update(dict.fromkeys(FIELDS))
        conn.execute(
            runs.update()
            .where(runs.c.id == run_id)
            .values(spec={**spec, "model": model}, model_source=source)
        )


def downgrade() -> None:
    conn = op.get_bind()
    runs = RUNS
    for run_id, spec, source in conn.execute(
        sa.select(runs.c.id, runs.c.spec, runs.c.model_source)
    ).all():
        spec = json.loads(spec) if isinstance(spec, str) else spec
        source = json.loads(source) if isinstance(source, str) else source
        if source:
            model = {**spec.get("model", {}), **source}
            conn.execute(
                runs.update().where(runs.c.id == run_id).values(spec={**spec, "model": model})
            )
    with op.batch_alter_table("runs", schema=None) as batch_op:
        batch_op.drop_column("model_source")
    op.drop_table("registered_models")
