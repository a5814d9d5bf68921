"""encrypted webhook secrets: runs keep them only encrypted (service/contract/sealing.py)

The plain-text columns give way to `*_encrypted` ones (text: a sealed secret is longer than the
80 characters of the old columns), so code that still read the old names fails loudly instead
of signing with ciphertext. Existing rows are encrypted, and decrypted again on downgrade, with
the settings' key: the Settings passed by `gvpo db upgrade` (service/migrate.py), else the
GVPO_* environment. A database without runs needs no key.

Revision ID: 0010
Revises: 0009
Create Date: 2026-12-04
"""

from collections.abc import Callable

import sqlalchemy as sa
from alembic import context, op

revision = "0010"
down_revision = "0009"
branch_labels = None
depends_on = None

# (plain column, encrypted column)
PAIRS = (
    ("webhook_secret", "webhook_secret_encrypted"),
    ("previous_webhook_secret", "previous_webhook_secret_encrypted"),
)


def _sealer():
    from service.config import get_settings

    return (context.config.attributes.get("settings") or get_settings()).sealer


def _runs(*columns: str) -> sa.TableClause:
    return sa.table("runs", sa.column("id"), *(sa.column(c) for c in columns))


def _converted(columns: tuple[str, ...], how: Callable[[object], Callable]) -> list[dict]:
    """Every run's `columns` passed through how(sealer), as bound values for _write. Worked
    out before the schema changes: SQLite's DDL is not transactional, so a migration stopped
    by a missing or wrong key must stop before it alters anything."""
    runs = _runs(*columns)
    rows = op.get_bind().execute(sa.select(runs.c.id, *(runs.c[c] for c in columns))).all()
    if not rows:
        return []
    fn = how(_sealer())
    return [
        {"b_id": run_id, **{f"b_{i}": v and fn(v) for i, v in enumerate(values)}}
        for run_id, *values in rows
    ]


def _write(columns: tuple[str, ...], values: list[dict]) -> None:
    if values:
        runs = _runs(*columns)
        set_ = {c: sa.bindparam(f"b_{i}") for i, c in enumerate(columns)}
        op.get_bind().execute(
            runs.update().where(runs.c.id == sa.bindparam("b_id")).values(set_), values
        )


def upgrade() -> None:
    plain, encrypted = zip(*PAIRS, strict=True)
    values = _converted(plain, lambda sealer: sealer.seal)
    with op.batch_alter_table("runs", schema=None) as batch_op:
        for column in encrypted:
            batch_op.add_column(sa.Column(column, sa.Text(), nullable=True))
    _write(encrypted, values)
    with op.batch_alter_table("runs", schema=None) as batch_op:
        batch_op.alter_column("webhook_secret_encrypted", existing_type=sa.Text(), nullable=False)
        for column in plain:
            batch_op.drop_column(column)


def downgrade() -> None:
    plain, encrypted = zip(*PAIRS, strict=True)
    values = _converted(encrypted, lambda sealer: sealer.open)
    with op.batch_alter_table("runs", schema=None) as batch_op:
        for column in plain:
            batch_op.add_column(sa.Column(column, sa.String(80), nullable=True))
    _write(plain, values)
    with op.batch_alter_table("runs", schema=None) as batch_op:
        batch_op.alter_column("webhook_secret", existing_type=sa.String(80), nullable=False)
        for column in encrypted:
            batch_op.drop_column(column)
