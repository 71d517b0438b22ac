//! Scripts kept as files of their own (Lua for Redis, SQL for PostgreSQL), so they read and
//! test as what they are. Both languages comment with `--`.

/// `script` without its comment lines: what is sent to the server needs none, and a script
/// sent whole on every call (an `EVAL`) should be no longer than it must.
pub(crate) fn without_comments(script: &str) -> String {
    script
        .lines()
        .filter(|line| !line.trim_start().starts_with("--"))
        .collect::<Vec<_>>()
        .join("\n")
}

#[cfg(test)]
mod tests {
    #[test]
    fn comment_lines_go_and_code_stays() {
        let script =
            "-- what it does\nlocal x = 1 -- kept: code before it\n  -- indented\nreturn x";
        assert_eq!(
            super::without_comments(script),
            "local x = 1 -- kept: code before it\nreturn x"
        );
    }
}
