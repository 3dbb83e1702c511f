//! `esperctl lists ...`

use std::path::Path;

use esper_engine::policy::{ListKind, NamedList};
use reqwest::Method;
use serde_json::json;

use super::client::{Body, decode, segment};
use super::table::{Table, rfc3339};
use super::{CtlError, Ctx, ListCmd, read_input};
use crate::store::ListRecord;
use crate::types::ListsResponse;
use crate::types::PutListResponse;

pub async fn run(ctx: &Ctx, cmd: ListCmd) -> Result<(), CtlError> {
    match cmd {
        ListCmd::List => list(ctx).await,
        ListCmd::Show { name } => show(ctx, &name).await,
        ListCmd::Set {
            name,
            kind,
            listed,
            file,
            mut items,
            empty,
        } => {
            items.extend(listed);
            set(ctx, &name, kind.as_deref(), file.as_deref(), items, empty).await
        }
        ListCmd::Delete { name } => delete(ctx, &name).await,
    }
}

fn count_items(n: usize) -> String {
    format!("{n} item{}", if n == 1 { "" } else { "s" })
}

/// Items of a list file: one per line, blank lines and lines starting with `#` skipped.
/// Addresses hold no `#`, so in an IP list one also starts a comment after an item; a
/// string (a user agent, a hash) may hold one, so in a string list it is kept.
fn file_items(text: &str, kind: ListKind) -> Vec<String> {
    text.lines()
        .map(|l| match kind {
            ListKind::Ip => l.split('#').next().unwrap_or(""),
            ListKind::String => l,
        })
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .map(str::to_string)
        .collect()
}

async fn list(ctx: &Ctx) -> Result<(), CtlError> {
    let v = ctx.client.get("/api/v1/lists").await?;
    ctx.emit(v, |v| {
        let r: ListsResponse = decode(&ctx.client, v)?;
        if r.lists.is_empty() {
            return Ok("no lists\n".into());
        }
        let mut t = Table::new(&["NAME", "KIND", "ITEMS", "UPDATED"]);
        for l in r.lists {
            t.row(vec![
                l.name,
                l.kind,
                l.items.to_string(),
                rfc3339(l.updated_at),
            ]);
        }
        Ok(t.render())
    })
}

async fn show(ctx: &Ctx, name: &str) -> Result<(), CtlError> {
    let v = ctx
        .client
        .get(&format!("/api/v1/lists/{}", segment(name)))
        .await?;
    ctx.emit(v, |v| {
        let l: ListRecord = decode(&ctx.client, v)?;
        let mut out = format!(
            "# {} ({} list, {}, updated {})\n",
            l.name,
            l.kind,
            count_items(l.items.len()),
            rfc3339(l.updated_at)
        );
        for i in l.items {
            out.push_str(&i);
            out.push('\n');
        }
        Ok(out)
    })
}

async fn set(
    ctx: &Ctx,
    name: &str,
    kind: Option<&str>,
    file: Option<&Path>,
    items: Vec<String>,
    empty: bool,
) -> Result<(), CtlError> {
    let path = format!("/api/v1/lists/{}", segment(name));
    let kind: ListKind = match kind {
        Some(kind) => kind
            .parse()
            .map_err(|e: String| CtlError::Input(format!("--kind: {e}")))?,
        // Replacing the items is not meant to change what the list is.
        None => match ctx.client.get_optional(&path).await? {
            Some(v) => {
                let l: ListRecord = decode(&ctx.client, v)?;
                l.kind
                    .parse()
                    .map_err(|e: String| CtlError::Input(format!("list {name}: {e}")))?
            }
            None => ListKind::Ip,
        },
    };
    let (items, source) = match file {
        Some(f) => (
            file_items(&read_input(f)?, kind),
            format!("{}: ", f.display()),
        ),
        None => (items, String::new()),
    };
    if items.is_empty() && !empty {
        return Err(CtlError::Input(format!(
            "{source}no items to store in list {name}: give them, or pass --empty to store it \
             with none"
        )));
    }
    let list = NamedList {
        name: name.to_string(),
        kind,
        items,
    };
    list.validate()
        .map_err(|e| CtlError::Input(format!("{source}{e}")))?;
    let v = ctx
        .client
        .send_text(
            Method::PUT,
            &path,
            Some(Body::Json(
                json!({"kind": kind.to_string(), "items": list.items}),
            )),
        )
        .await?;
    ctx.emit(v, |v| {
        let r: PutListResponse = decode(&ctx.client, v)?;
        let l = r.record;
        let mut out = format!(
            "list {} stored ({} list, {})\n",
            l.name,
            l.kind,
            count_items(l.items.len())
        );
        for id in &r.revoked {
            out.push_str(&format!(
                "revoked mitigation {id}: its entity is now allowlisted\n"
            ));
        }
        Ok(out)
    })
}

async fn delete(ctx: &Ctx, name: &str) -> Result<(), CtlError> {
    let v = ctx
        .client
        .send_text(
            Method::DELETE,
            &format!("/api/v1/lists/{}", segment(name)),
            None,
        )
        .await?;
    ctx.emit(v, |_| Ok(format!("list {name} deleted\n")))
}

#[cfg(test)]
mod tests {
    use esper_engine::policy::ListKind;

    #[test]
    fn list_files_skip_comments_and_blanks() {
        let items = super::file_items(
            "# office\n10.0.0.0/8\n\n 192.0.2.1  # vpn\n  # indented\n",
            ListKind::Ip,
        );
        assert_eq!(items, ["10.0.0.0/8", "192.0.2.1"]);
    }

    #[test]
    fn a_string_list_keeps_a_hash_inside_an_item() {
        let items = super::file_items(
            "# agents\nC# client\n Mozilla/5.0 (compatible; #1) \n#gone\nfoo#bar\n",
            ListKind::String,
        );
        assert_eq!(
            items,
            ["C# client", "Mozilla/5.0 (compatible; #1)", "foo#bar"]
        );
    }
}
