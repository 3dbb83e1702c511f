//! A numbered outbox kept in Redis beside the state it records, delivered by one owner
//! at a time under a lease: the mitigation broker's outbox to the decision log and the
//! engine's both use it, each from its own Lua scripts, which start with [`LUA`].
//!
//! The outbox is a list of `N entry` strings, `N` drawn from a counter key, so that an
//! acknowledgement removes by number rather than by count (entries trimmed for room
//! meanwhile are not counted twice). The lease is a key holding its owner's name with an
//! expiry. Only the holder removes anything: an owner whose lease ran out, or whose Redis
//! lost its data meanwhile, must not remove entries it never read.

/// Lua functions for scripts working on an outbox: `outbox_append`, `outbox_claim`,
/// `outbox_ack` and `outbox_release`. Their answers are what [`parse_claim`] and
/// [`parse_ack`] read.
pub const LUA: &str = r#"
-- Appends `entries` (a table of strings) to list `out`, each numbered from counter
-- `seq`; with `cap`, trims the oldest beyond it. Returns how many were trimmed, and the
-- list's length.
local function outbox_append(out, seq, entries, cap)
  for _, e in ipairs(entries) do
    redis.call('RPUSH', out, string.format('%d', redis.call('INCR', seq)) .. ' ' .. e)
  end
  local dropped = 0
  if cap then
    dropped = math.max(0, redis.call('LLEN', out) - cap)
    if dropped > 0 then redis.call('LTRIM', out, dropped, -1) end
  end
  return dropped, redis.call('LLEN', out)
end
-- Takes or renews the lease for `owner` and reads the oldest `limit` entries; or names
-- the holder when it is someone else.
local function outbox_claim(out, lease, owner, lease_ms, limit)
  local holder = redis.call('GET', lease)
  local pending = tostring(redis.call('LLEN', out))
  if holder and holder ~= owner then return {'held', holder, pending} end
  redis.call('SET', lease, owner, 'PX', lease_ms)
  local answer = {'mine', owner, pending}
  for _, e in ipairs(redis.call('LRANGE', out, 0, limit - 1)) do
    answer[#answer + 1] = e
  end
  return answer
end
-- Removes the entries numbered in `delivered` (a table of number texts), if `owner`
-- still holds the lease (renewed). They are the head of the list, as read (appends go to
-- the tail, trims take the head), so it pops while the head is one of them, each number
-- once: exactly those, even if the numbering started over meanwhile (its counter lost,
-- the list kept). An entry without a number, unreadable anyway, goes with them.
local function outbox_ack(out, lease, owner, delivered, lease_ms)
  if redis.call('GET', lease) ~= owner then
    return {'0', tostring(redis.call('LLEN', out))}
  end
  redis.call('PEXPIRE', lease, lease_ms)
  local set = {}
  for _, n in ipairs(delivered) do set[n] = true end
  while true do
    local e = redis.call('LINDEX', out, 0)
    if not e then break end
    local n = string.match(e, '^(%d+) ')
    if n and not set[n] then break end
    if n then set[n] = nil end
    redis.call('LPOP', out)
  end
  return {'1', tostring(redis.call('LLEN', out))}
end
local function outbox_release(lease, owner)
  if redis.call('GET', lease) == owner then redis.call('DEL', lease) end
  return 1
end
"#;

/// What a claim on an outbox found.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Claim {
    /// Another owner delivers the outbox (its name).
    Held { by: String, pending: usize },
    /// This owner holds the delivery lease: the oldest entries with their numbers.
    Mine {
        pending: usize,
        entries: Vec<(u64, String)>,
    },
}

/// Reads `outbox_claim`'s answer.
pub fn parse_claim(answer: Vec<String>) -> Result<Claim, String> {
    let mut parts = answer.into_iter();
    let (Some(kind), Some(holder), Some(pending)) = (parts.next(), parts.next(), parts.next())
    else {
        return Err("a claim on the outbox answered too little".into());
    };
    let pending = length(&pending)?;
    if kind == "held" {
        return Ok(Claim::Held {
            by: holder,
            pending,
        });
    }
    let entries = parts
        .map(|e| {
            e.split_once(' ')
                .and_then(|(n, body)| Some((n.parse().ok()?, body.to_string())))
                .ok_or_else(|| "an outbox entry without its number".to_string())
        })
        .collect::<Result<_, _>>()?;
    Ok(Claim::Mine { pending, entries })
}

/// Reads `outbox_ack`'s answer: whether the owner still held the lease (and removed the
/// entries), and the outbox's length after.
pub fn parse_ack(answer: (String, String)) -> Result<(bool, usize), String> {
    Ok((answer.0 == "1", length(&answer.1)?))
}

fn length(text: &str) -> Result<usize, String> {
    text.parse()
        .map_err(|_| format!("the outbox's length is not a number: {text:?}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn strings(s: &[&str]) -> Vec<String> {
        s.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn claims_read_the_holder_or_the_numbered_entries() {
        assert_eq!(
            parse_claim(strings(&["held", "b-2", "7"])),
            Ok(Claim::Held {
                by: "b-2".into(),
                pending: 7
            })
        );
        assert_eq!(
            parse_claim(strings(&[
                "mine",
                "b-1",
                "2",
                "41 {\"a\": 1}",
                "100000000000000 x"
            ])),
            Ok(Claim::Mine {
                pending: 2,
                entries: vec![(41, "{\"a\": 1}".into()), (100_000_000_000_000, "x".into())]
            })
        );
        assert!(parse_claim(strings(&["mine", "b-1"])).is_err());
        assert!(parse_claim(strings(&["mine", "b-1", "1", "1e14 x"])).is_err());
        assert!(parse_claim(strings(&["mine", "b-1", "many"])).is_err());
        assert_eq!(parse_ack(("1".into(), "0".into())), Ok((true, 0)));
        assert_eq!(parse_ack(("0".into(), "3".into())), Ok((false, 3)));
    }
}
