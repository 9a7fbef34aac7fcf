"""Completion webhooks: the callback URL of a scan and its delivery state.

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-23
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("scans") as batch:
        batch.add_column(sa.Column("callback_url", sa.Text))
        batch.add_column(sa.Column("webhook_attempts", sa.Integer, nullable=False, server_default="0"))
        batch.add_column(sa.Column("webhook_delivered_at", sa.DateTime(timezone=True)))
        batch.add_column(sa.Column("webhook_error", sa.Text))


def downgrade() -> None:
    with op.batch_alter_table("scans") as batch:
        for column in ("webhook_error", "webhook_delivered_at", "webhook_attempts", "callback_url"):
            batch.drop_column(column)
