"""The MLflow admin account seeded before the server starts: a cheap hash of the generated
secret, accepted by MLflow's own auth store, and an older scrypt hash replaced."""

from __future__ import annotations

from mlflow.server.auth.db.models import SqlUser
from mlflow.server.auth.sqlalchemy_store import SqlAlchemyStore

from deployments.mlflow_admin import HASH_METHOD, seed_admin

PASSWORD = "0123456789abcdef0123456789abcdef"


def _store(path) -> SqlAlchemyStore:
    store = SqlAlchemyStore()
    store.init_db(f"sqlite:///{path}")
    return store


def _hash(store: SqlAlchemyStore, username: str) -> str:
    with store.ManagedSessionMaker() as session:
        return session.query(SqlUser).filter(SqlUser.username == username).one().password_hash


def test_a_fresh_database_gets_an_admin_with_the_cheap_hash(tmp_path):
    db = tmp_path / "basic_auth.db"
    seed_admin(db, "saeflow", PASSWORD)
    store = _store(db)
    assert store.get_user("saeflow").is_admin
    assert _hash(store, "saeflow").startswith(f"{HASH_METHOD}$")
    assert store.authenticate_user("saeflow", PASSWORD)
    assert not store.authenticate_user("saeflow", PASSWORD[:-1] + "0")


def test_an_existing_scrypt_hash_is_replaced_and_a_second_seed_changes_nothing(tmp_path):
    db = tmp_path / "basic_auth.db"
    store = _store(db)
    store.create_user("saeflow", PASSWORD, is_admin=True)
    assert _hash(store, "saeflow").startswith("scrypt:")
    seed_admin(db, "saeflow", PASSWORD)
    first = _hash(store, "saeflow")
    assert first.startswith(f"{HASH_METHOD}$") and store.authenticate_user("saeflow", PASSWORD)
    seed_admin(db, "saeflow", PASSWORD)
    assert _hash(store, "saeflow") == first
