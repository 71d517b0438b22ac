//! The store's SQL, kept as data: one file per statement under `sql/`, written once for the
//! store's table. Placeholders: `{table}` (maybe `schema.table`), `{base}` (the table's own
//! name, for index names), and the fragments below.

use crate::script::without_comments;

/// Now on the database's clock, in Unix milliseconds: every instance decides expiry on the same
/// clock, as Redis's `TIME` does for the Redis store.
const NOW: &str = "(extract(epoch from clock_timestamp()) * 1000)::bigint";

/// A row whose data is not a JSON object is no session: written by something else, or damaged.
const WELL_FORMED: &str = "jsonb_typeof(data) = 'object'";

/// The columns a whole row is written in, in the order `create` and `cycle` bind them.
const COLUMNS: &str =
    "tenant, id, user_id, data, created_at, expires_at, idle_ms, idle_until, persistent";

/// A row written over one already there (an id written twice) replaces it, one version on.
const ON_CONFLICT: &str = "ON CONFLICT (tenant, id) DO UPDATE SET user_id = EXCLUDED.user_id, \
     data = EXCLUDED.data, created_at = EXCLUDED.created_at, \
     expires_at = EXCLUDED.expires_at, idle_ms = EXCLUDED.idle_ms, \
     idle_until = EXCLUDED.idle_until, persistent = EXCLUDED.persistent, \
     version = {table}.version + 1";

/// The store's statements, written once for its table.
#[derive(Debug)]
pub(super) struct Statements {
    pub(super) table: String,
    /// Creates the table and its indexes (idempotent), comments kept: teams that manage their
    /// schema themselves read it.
    pub(super) migration: String,
    pub(super) load: String,
    pub(super) slide: String,
    pub(super) create: String,
    pub(super) update: String,
    pub(super) cycle: String,
    pub(super) delete: String,
    pub(super) list: String,
    pub(super) delete_user: String,
    pub(super) cleanup: String,
    pub(super) version: String,
    pub(super) generation: String,
    pub(super) bump_generation: String,
}

impl Statements {
    /// The statements for `table` (`table` or `schema.table`, already checked by
    /// [`valid_table`]).
    pub(super) fn new(table: &str) -> Self {
        let sql = |template: &str| render(&without_comments(template), table);
        Self {
            table: table.to_owned(),
            migration: render(include_str!("sql/migration.sql"), table),
            load: sql(include_str!("sql/load.sql")),
            slide: sql(include_str!("sql/slide.sql")),
            create: sql(include_str!("sql/create.sql")),
            update: sql(include_str!("sql/update.sql")),
            cycle: sql(include_str!("sql/cycle.sql")),
            delete: sql(include_str!("sql/delete.sql")),
            list: sql(include_str!("sql/list.sql")),
            delete_user: sql(include_str!("sql/delete_user.sql")),
            cleanup: sql(include_str!("sql/cleanup.sql")),
            version: sql(include_str!("sql/version.sql")),
            generation: sql(include_str!("sql/generation.sql")),
            bump_generation: sql(include_str!("sql/bump_generation.sql")),
        }
    }
}

/// Whether `table` names a table the statements can be written for: `table` or
/// `schema.table`, each part 1 to 63 lower-case letters, digits or `_`, not starting with a
/// digit (nothing that would need quoting, nothing that could break a statement).
pub(super) fn valid_table(table: &str) -> bool {
    let valid_part = |part: &str| {
        (1..=63).contains(&part.len())
            && !part.starts_with(|c: char| c.is_ascii_digit())
            && part
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_')
    };
    let parts: Vec<&str> = table.split('.').collect();
    parts.len() <= 2 && parts.iter().all(|part| valid_part(part))
}

/// `template` for `table`, its placeholders filled in.
fn render(template: &str, table: &str) -> String {
    // Index names live in the table's schema; derive them from the table's own name.
    let base = table.rsplit('.').next().unwrap_or(table);
    template
        .trim_end()
        .replace("{on_conflict}", ON_CONFLICT)
        .replace("{columns}", COLUMNS)
        .replace("{now}", NOW)
        .replace("{well_formed}", WELL_FORMED)
        .replace("{base}", base)
        .replace("{table}", table)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_placeholder_is_filled_and_the_table_named() {
        let sql = Statements::new("app.sessions");
        for statement in [
            &sql.load,
            &sql.slide,
            &sql.create,
            &sql.update,
            &sql.cycle,
            &sql.delete,
            &sql.list,
            &sql.delete_user,
            &sql.cleanup,
            &sql.version,
            &sql.generation,
            &sql.bump_generation,
        ] {
            assert!(!statement.contains('{'), "{statement}");
            assert!(!statement.contains("--"), "{statement}");
            assert!(statement.contains("app.sessions"), "{statement}");
        }
        assert!(
            sql.migration
                .contains("CREATE INDEX IF NOT EXISTS sessions_user ON app.sessions")
        );
        assert!(sql.migration.contains("DEFAULT '{}'"), "{}", sql.migration);
        assert!(sql.create.contains("version = app.sessions.version + 1"));
    }

    #[test]
    fn table_names_that_need_no_quoting() {
        for good in ["turnstile_sessions", "app.sessions", "s1", "_x"] {
            assert!(valid_table(good), "{good}");
        }
        for bad in [
            "",
            "1x",
            "Sessions",
            "a.b.c",
            "a-b",
            "x;drop",
            "a.",
            &"x".repeat(64),
        ] {
            assert!(!valid_table(bad), "{bad}");
        }
    }
}
