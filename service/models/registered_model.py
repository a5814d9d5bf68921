from datetime import datetime

from sqlalchemy import String
from sqlalchemy.orm import Mapped, mapped_column

from service.contract.limits import MAX_PATH
from service.models.base import Base, UTCDateTime, utcnow


class RegisteredModel(Base):
    """A base model the operator registered (`gvpo models add NAME PATH`): any project's run may
    name it in model.path, and never sees the folder it stands for."""

    __tablename__ = "registered_models"

    name: Mapped[str] = mapped_column(String(100), primary_key=True)
    path: Mapped[str] = mapped_column(String(MAX_PATH))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)
