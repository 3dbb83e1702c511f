//! The Redis mitigation store, shared by every broker instance that points at the same
//! Redis and key prefix.
//!
//! Mitigations live in hashes (id → JSON, entity, action) with their expiries in a
//! sorted set, their ids in a lexically ordered set (snapshot pages resume after an id)
//! and one set of ids per entity. Every upsert and revoke appends to a Redis
//! Stream (`XADD ... MAXLEN ~ retention`) carrying a per-generation sequence number, so
//! the delta cursor is `GENERATION-STREAMID` and means the same on every instance: a
//! proxy can resume from any of them. A cursor is served while its entry is still in the
//! stream and no more than `retention` changes old; else its holder gets a snapshot.
//! `clear` sets a new random generation, so every earlier cursor turns stale. Each
//! operation is one Lua script, atomic across instances.
//!
//! With persistence, the decision log's outbox is a list beside them: each write appends
//! its numbered entries in the same script ([`Journal`]), and the instance holding the
//! delivery lease (a key with an expiry) reads the oldest and removes what it delivered.
//!
//! An instance restoring an empty store from the log marks itself in a sorted set (owner
//! → deadline). While any mark stands, every write script of every instance notes the
//! ids and entities it touches (or that it cleared everything), in the same step as the
//! write, and a restore page publishes only what no such note names: a revocation made
//! through another instance after the page was read cannot be undone by it.

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::sync::{Arc, Weak};
use std::time::Duration;

use chrono::Utc;
use esper_protocol::outbox;
use esper_protocol::{Action, Change, DeltaPage, EntityKey, Mitigation};
use parking_lot::Mutex;
use redis::Script;
use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use tokio::sync::watch;

use super::{
    ActivePage, Claim, Cursor, Journal, LogAppend, Logged, MitigationStore, Published, RestorePage,
    StoreError, Write,
};

/// How often an instance looks for changes written through other instances, to wake
/// its stream long-polls (changes through this instance wake them at once).
const WATCH_INTERVAL: Duration = Duration::from_millis(25);
const RESPONSE_TIMEOUT: Duration = Duration::from_secs(2);
const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
/// Most ids and entities noted for the restores under way (about 100 bytes each); past
/// it they give up, as after a clear, and the engine publishes again what still goes on.
const MAX_NOTES: usize = 100_000;

/// Declarations every script starts with. ARGV[1] is a fresh generation (used only
/// when none exists yet), ARGV[2] the change retention, ARGV[3] now in milliseconds.
const PRELUDE: &str = r#"
local M, EXP, ENT, ACT, CH, GEN, SEQ, EIDX, IDS, OUT, OSEQ, LEASE =
  KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5], KEYS[6], KEYS[7], KEYS[8], KEYS[9],
  KEYS[10], KEYS[11], KEYS[12]
local RST, TIDS, TENTS, TALL, DUE = KEYS[13], KEYS[14], KEYS[15], KEYS[16], KEYS[17]
local retention, now = tonumber(ARGV[2]), tonumber(ARGV[3])
local function origin(g)
  redis.call('SET', GEN, g)
  redis.call('SET', SEQ, 0)
  redis.call('DEL', CH)
  redis.call('XADD', CH, '*', 'n', 0, 'op', 'o')
  return g
end
local function ensure()
  local g = redis.call('GET', GEN)
  if not g then
    -- A store without a generation was never used, or lost its data (flushed, or a
    -- Redis restarted without persistence): what was in force is gone, and a restore
    -- from the decision log is due (taken up as one left half-way; see
    -- RESTORE_ORPHANED). Never used, the start-up restore finishes it at once.
    redis.call('SET', DUE, '1')
    return origin(ARGV[1])
  end
  if redis.call('EXISTS', CH) == 0 then
    redis.call('XADD', CH, '*', 'n', redis.call('GET', SEQ) or 0, 'op', 'o')
  end
  return g
end
local function field(fields, name)
  for i = 1, #fields, 2 do
    if fields[i] == name then return fields[i + 1] end
  end
  return nil
end
local function head_id()
  return redis.call('XREVRANGE', CH, '+', '-', 'COUNT', 1)[1][1]
end
local function state(g)
  return g .. ':' .. (redis.call('GET', SEQ) or '0')
end
local function append(op, d)
  local n = redis.call('INCR', SEQ)
  return redis.call('XADD', CH, 'MAXLEN', '~', retention, '*', 'n', n, 'op', op, 'd', d)
end
-- Forgets a mitigation; returns its expiry (ms), or nil when it was not stored.
local function remove(id)
  local ent = redis.call('HGET', ENT, id)
  if not ent then return nil end
  local exp = tonumber(redis.call('ZSCORE', EXP, id) or '0')
  redis.call('SREM', EIDX .. ent, id)
  redis.call('ZREM', IDS, id)
  redis.call('HDEL', M, id)
  redis.call('HDEL', ENT, id)
  redis.call('HDEL', ACT, id)
  redis.call('ZREM', EXP, id)
  return exp
end
-- Stores (or, when not active, forgets) one mitigation; returns whether it counts as
-- accepted.
local function put(id, json, ent, exp, active, act)
  if active == '0' then
    if remove(id) then
      append('r', id)
      return true
    end
    return false
  end
  if redis.call('HGET', M, id) ~= json then
    remove(id)
    redis.call('HSET', M, id, json)
    redis.call('HSET', ENT, id, ent)
    redis.call('HSET', ACT, id, act)
    redis.call('ZADD', EXP, exp, id)
    redis.call('SADD', EIDX .. ent, id)
    redis.call('ZADD', IDS, 0, id)
    append('u', json)
  end
  return true
end
-- Restore marks run on Redis's clock, not the instances' (which may disagree), so
-- every instance sees a mark stand or lapse at the same moment.
local function rnow()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end
local restoring = redis.call('EXISTS', RST) == 1
  and redis.call('ZCOUNT', RST, '(' .. rnow(), '+inf') > 0
-- Marks and notes expire with the last mark, so a restorer that died leaves nothing
-- behind for long.
local function keep_marks()
  local last = redis.call('ZRANGE', RST, -1, -1, 'WITHSCORES')[2]
  if not last then return end
  for _, k in ipairs({RST, TIDS, TENTS, TALL}) do
    if redis.call('EXISTS', k) == 1 then redis.call('PEXPIREAT', k, last) end
  end
end
local kept = false
-- Notes what a write touches while some instance restores (see the module's doc); past
-- MAX_NOTES the notes give way to "everything", which ends the restores under way.
local function note(set, member)
  if not restoring or redis.call('EXISTS', TALL) == 1 then return end
  redis.call('SADD', set, member)
  if redis.call('SCARD', TIDS) + redis.call('SCARD', TENTS) > MAX_NOTES then
    redis.call('SET', TALL, '1')
    redis.call('DEL', TIDS, TENTS)
    kept = false
  end
  if not kept then
    keep_marks()
    kept = true
  end
end
local function note_all()
  if restoring then
    redis.call('SET', TALL, '1')
    redis.call('DEL', TIDS, TENTS)
    keep_marks()
  end
end
-- Forgets lapsed marks; with none left standing, the notes too.
local function prune_marks()
  redis.call('ZREMRANGEBYSCORE', RST, '-inf', rnow())
  if redis.call('ZCARD', RST) == 0 then redis.call('DEL', TIDS, TENTS, TALL) end
end
-- Write scripts: ARGV[4] the outbox mode ('' none, 'reject' or 'drop' when full),
-- ARGV[5] its capacity, ARGV[6] the count n of entries, ARGV[7 .. 6+n] the entries; the
-- write's own arguments start at ARGV[7+n] (the second value returned).
local function outbox()
  local n = tonumber(ARGV[6])
  return {mode = ARGV[4], cap = tonumber(ARGV[5]), first = 7, last = 6 + n}, 7 + n
end
local function full(log)
  return log.mode == 'reject' and redis.call('LLEN', OUT) + (log.last - log.first + 1) > log.cap
end
-- Appends the write's entries, numbered; returns how many of the oldest were dropped
-- for room, and the outbox's length.
local function journal(log)
  if log.mode == '' then return 0, 0 end
  local entries = {}
  for i = log.first, log.last do entries[#entries + 1] = ARGV[i] end
  return outbox_append(OUT, OSEQ, entries, log.mode == 'drop' and log.cap or nil)
end
"#;

/// The write's arguments: groups of id, JSON, entity, expiry ms, active flag, action name.
const PUBLISH: &str = r#"
local log, at = outbox()
if full(log) then return {'full'} end
local g = ensure()
local accepted = 0
for i = at, #ARGV, 6 do
  note(TIDS, ARGV[i])
  if put(ARGV[i], ARGV[i+1], ARGV[i+2], ARGV[i+3], ARGV[i+4], ARGV[i+5]) then
    accepted = accepted + 1
  end
end
local dropped, pending = journal(log)
return {'ok', tostring(accepted), g .. '-' .. head_id(), state(g), tostring(dropped),
  tostring(pending)}
"#;

const ACTIVE: &str = r#"
ensure()
local out = {}
for _, id in ipairs(redis.call('ZRANGEBYSCORE', EXP, '(' .. now, '+inf')) do
  local json = redis.call('HGET', M, id)
  if json then out[#out + 1] = json end
end
return out
"#;

/// ARGV[4..]: entity keys.
const FOR_ENTITY: &str = r#"
ensure()
local out = {}
for i = 4, #ARGV do
  for _, id in ipairs(redis.call('SMEMBERS', EIDX .. ARGV[i])) do
    local json = redis.call('HGET', M, id)
    if json then out[#out + 1] = json end
  end
end
return out
"#;

/// The write's arguments: 'id' or 'entity', then the id or entity key.
const REVOKE: &str = r#"
local log, at = outbox()
if full(log) then return {'full'} end
local g = ensure()
local ids
if ARGV[at] == 'id' then
  note(TIDS, ARGV[at + 1])
  ids = {ARGV[at + 1]}
else
  note(TENTS, ARGV[at + 1])
  ids = redis.call('SMEMBERS', EIDX .. ARGV[at + 1])
end
local revoked = 0
for _, id in ipairs(ids) do
  local exp = remove(id)
  if exp and exp > now then
    append('r', id)
    revoked = revoked + 1
  elseif not exp and ARGV[at] == 'id' then
    -- Passed on all the same: a follower may hold it from before the store lost its
    -- data (a restore under way) and learns of it no other way.
    append('r', id)
  end
end
local dropped, pending = journal(log)
return {'ok', tostring(revoked), state(g), tostring(dropped), tostring(pending)}
"#;

const CLEAR: &str = r#"
local log = outbox()
if full(log) then return {'full'} end
ensure()
note_all()
-- What a restore left half-way would bring back was just cleared.
redis.call('DEL', DUE)
local active = redis.call('ZCOUNT', EXP, '(' .. now, '+inf')
for _, ent in ipairs(redis.call('HVALS', ENT)) do redis.call('DEL', EIDX .. ent) end
redis.call('DEL', M, EXP, ENT, ACT, IDS)
local g = origin(ARGV[1])
local dropped, pending = journal(log)
return {'ok', tostring(active), state(g), tostring(dropped), tostring(pending)}
"#;

/// A new generation over the same mitigations (see `MitigationStore::rebase`).
const REBASE: &str = r#"
ensure()
return state(origin(ARGV[1]))
"#;

/// ARGV[4] the owner, ARGV[5] the lease in ms, ARGV[6] most entries to read.
const CLAIM: &str = "return outbox_claim(OUT, LEASE, ARGV[4], ARGV[5], tonumber(ARGV[6]))";

/// ARGV[4] the owner, ARGV[5] the lease in ms, ARGV[6..] the numbers delivered.
const ACK: &str = r#"
local delivered = {}
for i = 6, #ARGV do delivered[#delivered + 1] = ARGV[i] end
return outbox_ack(OUT, LEASE, ARGV[4], delivered, ARGV[5])
"#;

/// ARGV[4] the owner.
const RELEASE: &str = "return outbox_release(LEASE, ARGV[4])";

/// ARGV[4] the restoring owner, ARGV[5] how long its mark stands in ms. Answers the
/// number of the outbox's last entry: every entry up to it was written before the mark
/// (and is not noted), every later one after it.
const RESTORE_BEGIN: &str = r#"
prune_marks()
redis.call('SET', DUE, '1')
redis.call('ZADD', RST, rnow() + tonumber(ARGV[5]), ARGV[4])
keep_marks()
return redis.call('GET', OSEQ) or '0'
"#;

/// The number of the outbox's first entry ('' when it is empty, '0' when unnumbered).
const OUTBOX_HEAD: &str = r#"
local e = redis.call('LINDEX', OUT, 0)
if not e then return '' end
return string.match(e, '^(%d+) ') or '0'
"#;

/// ARGV[4] the restoring owner, ARGV[5] how long its mark stands in ms, then the page's
/// mitigations as PUBLISH takes them. Answers `lapsed` when the owner's mark ran out (a
/// write may have gone unnoted), `cleared` when the notes say everything, else `ok`, how
/// many were published, and the store's state.
const RESTORE_PAGE: &str = r#"
local t = rnow()
local deadline = tonumber(redis.call('ZSCORE', RST, ARGV[4]) or '0')
if deadline <= t then return {'lapsed'} end
redis.call('ZADD', RST, 'XX', t + tonumber(ARGV[5]), ARGV[4])
keep_marks()
if redis.call('EXISTS', TALL) == 1 then return {'cleared'} end
local g = ensure()
local published = 0
for i = 6, #ARGV, 6 do
  local id, ent = ARGV[i], ARGV[i+2]
  if redis.call('SISMEMBER', TIDS, id) == 0 and redis.call('SISMEMBER', TENTS, ent) == 0
    and put(id, ARGV[i+1], ent, ARGV[i+3], ARGV[i+4], ARGV[i+5]) then
    published = published + 1
  end
end
return {'ok', tostring(published), state(g)}
"#;

/// ARGV[4] the owner whose restore ended, ARGV[5] '1' when it finished (else it stopped
/// half-way, and stays due).
const RESTORE_END: &str = r#"
redis.call('ZREM', RST, ARGV[4])
prune_marks()
if ARGV[5] == '1' then redis.call('DEL', DUE) end
return 1
"#;

/// Whether a restore was begun and neither finished nor cleared, with no mark standing:
/// its restorer stopped half-way.
const RESTORE_ORPHANED: &str = r#"
prune_marks()
if redis.call('EXISTS', DUE) == 1 and redis.call('ZCARD', RST) == 0 then return 1 end
return 0
"#;

/// ARGV[4] the cursor's generation, ARGV[5] its stream id ('' when unusable),
/// ARGV[6] the page size, ARGV[7] `>` and the id a snapshot page continues after ('' for
/// the changes after the cursor). Answers `d` (deltas) or `s` (a snapshot page), the cursor,
/// the snapshot's continuation ('' when none), on a snapshot's first page the count of
/// active mitigations ('' elsewhere), then each change as `u<json>` or `r<id>`.
const CHANGES: &str = r#"
local g = ensure()
local cg, cid, limit, paging = ARGV[4], ARGV[5], tonumber(ARGV[6]), ARGV[7] ~= ''
local after = string.sub(ARGV[7], 2)
local resumable = false
if cg == g and cid ~= '' then
  local at = redis.call('XRANGE', CH, cid, cid)
  if #at > 0 then
    local n0 = tonumber(field(at[1][2], 'n'))
    local head = tonumber(redis.call('GET', SEQ) or '0')
    resumable = head - n0 <= retention
  end
end
if resumable and not paging then
  local out = {'d', '', '', ''}
  local last = cid
  for _, e in ipairs(redis.call('XRANGE', CH, '(' .. cid, '+', 'COUNT', limit)) do
    last = e[1]
    local op = field(e[2], 'op')
    if op == 'u' or op == 'r' then out[#out + 1] = op .. field(e[2], 'd') end
  end
  out[2] = g .. '-' .. last
  return out
end
local min = '-'
if resumable then
  min = '(' .. after
else
  -- Ids stored before the id index existed are indexed on the first snapshot.
  if redis.call('ZCARD', IDS) ~= redis.call('HLEN', M) then
    redis.call('DEL', IDS)
    local ids = redis.call('HKEYS', M)
    for i = 1, #ids, 1000 do
      local batch = {}
      for j = i, math.min(i + 999, #ids) do
        batch[#batch + 1] = 0
        batch[#batch + 1] = ids[j]
      end
      redis.call('ZADD', IDS, unpack(batch))
    end
  end
  cid = head_id()
end
local out = {'s', g .. '-' .. cid, '', ''}
if not resumable then
  out[4] = tostring(redis.call('ZCOUNT', EXP, '(' .. now, '+inf'))
end
local n, last = 0, ''
while true do
  local ids = redis.call('ZRANGEBYLEX', IDS, min, '+', 'LIMIT', 0, limit + 1)
  for _, id in ipairs(ids) do
    if tonumber(redis.call('ZSCORE', EXP, id) or '0') > now then
      if n == limit then
        out[3] = last
        return out
      end
      local json = redis.call('HGET', M, id)
      if json then
        out[#out + 1] = 'u' .. json
        n = n + 1
        last = id
      end
    end
  end
  if #ids <= limit then return out end
  min = '(' .. ids[#ids]
end
"#;

const SWEEP: &str = r#"
ensure()
local n = 0
for _, id in ipairs(redis.call('ZRANGEBYSCORE', EXP, '-inf', now, 'LIMIT', 0, 10000)) do
  remove(id)
  n = n + 1
end
return n
"#;

const COUNTS: &str = r#"
ensure()
local counts = {}
for _, id in ipairs(redis.call('ZRANGEBYSCORE', EXP, '(' .. now, '+inf')) do
  local act = redis.call('HGET', ACT, id)
  if act then counts[act] = (counts[act] or 0) + 1 end
end
local out = {}
for act, n in pairs(counts) do
  out[#out + 1] = act
  out[#out + 1] = tostring(n)
end
return out
"#;

struct Scripts {
    publish: Script,
    active: Script,
    for_entity: Script,
    revoke: Script,
    clear: Script,
    rebase: Script,
    changes: Script,
    sweep: Script,
    counts: Script,
    claim: Script,
    ack: Script,
    release: Script,
    restore_begin: Script,
    outbox_head: Script,
    restore_page: Script,
    restore_end: Script,
    restore_orphaned: Script,
}

impl Scripts {
    fn new() -> Scripts {
        let s = |body: &str| {
            Script::new(&format!(
                "{}local MAX_NOTES = {MAX_NOTES}\n{PRELUDE}{body}",
                outbox::LUA
            ))
        };
        Scripts {
            publish: s(PUBLISH),
            active: s(ACTIVE),
            for_entity: s(FOR_ENTITY),
            revoke: s(REVOKE),
            clear: s(CLEAR),
            rebase: s(REBASE),
            changes: s(CHANGES),
            sweep: s(SWEEP),
            counts: s(COUNTS),
            claim: s(CLAIM),
            ack: s(ACK),
            release: s(RELEASE),
            restore_begin: s(RESTORE_BEGIN),
            outbox_head: s(OUTBOX_HEAD),
            restore_page: s(RESTORE_PAGE),
            restore_end: s(RESTORE_END),
            restore_orphaned: s(RESTORE_ORPHANED),
        }
    }
}

/// What the watcher last saw (`GENERATION:SEQ`), and how many local writes have
/// reported since, so a slow look at Redis never overwrites a newer local report.
struct Seen {
    epoch: u64,
    state: String,
}

struct Shared {
    conn: ConnectionManager,
    keys: [String; 17],
    retention: usize,
    scripts: Scripts,
    seen: Mutex<Seen>,
    changed: watch::Sender<u64>,
}

/// Active mitigations and their change stream in Redis.
pub struct RedisMitigations {
    shared: Arc<Shared>,
}

fn unavailable(e: redis::RedisError) -> StoreError {
    StoreError::Unavailable(format!("Redis: {e}"))
}

fn garbled(what: &str) -> StoreError {
    StoreError::Unavailable(format!("unexpected answer from Redis: {what}"))
}

/// Appends the arguments the scripts' `put` takes for each of `mitigations`.
fn put_args(args: &mut Vec<String>, mitigations: &[Mitigation]) -> Result<(), StoreError> {
    let now = Utc::now();
    args.reserve(mitigations.len() * 6);
    for m in mitigations {
        let json = serde_json::to_string(m)
            .map_err(|e| garbled(&format!("cannot encode a mitigation: {e}")))?;
        args.push(m.id.clone());
        args.push(json);
        args.push(m.entity.to_string());
        args.push(millis(m.expires_at).to_string());
        args.push(if m.is_active(now) { "1" } else { "0" }.to_string());
        args.push(m.action.name().to_string());
    }
    Ok(())
}

fn garbled_outbox(what: String) -> StoreError {
    garbled(&what)
}

/// A stored mitigation, or `None` for one this broker cannot read (written by another
/// version sharing the Redis, say): skipped, so that one record does not fail every
/// list, lookup and stream page until it expires. Logged at most once a minute.
fn decode(json: &str) -> Option<Mitigation> {
    use std::sync::atomic::{AtomicI64, Ordering};
    static LAST_WARNED: AtomicI64 = AtomicI64::new(0);
    match serde_json::from_str(json) {
        Ok(m) => Some(m),
        Err(e) => {
            let now = Utc::now().timestamp();
            let last = LAST_WARNED.load(Ordering::Relaxed);
            if now - last >= 60
                && LAST_WARNED
                    .compare_exchange(last, now, Ordering::Relaxed, Ordering::Relaxed)
                    .is_ok()
            {
                let shown: String = json.chars().take(200).collect();
                tracing::warn!(error = %e, record = %shown, "skipped a stored mitigation this broker cannot read");
            }
            None
        }
    }
}

fn count(part: Option<String>, what: &str) -> Result<usize, StoreError> {
    part.and_then(|n| n.parse().ok())
        .ok_or_else(|| garbled(what))
}

fn millis(t: chrono::DateTime<Utc>) -> i64 {
    t.timestamp_millis()
}

fn newest_first(a: &Mitigation, b: &Mitigation) -> std::cmp::Ordering {
    b.created_at
        .cmp(&a.created_at)
        .then_with(|| a.id.cmp(&b.id))
}

/// The static name of an action as stored (`block`, `throttle`, ...).
fn action_name(stored: &str) -> Option<&'static str> {
    [
        Action::Block,
        Action::Throttle {
            rate: 0.0,
            burst: 0,
        },
        Action::Tarpit { delay_ms: 0 },
        Action::Challenge { difficulty: 0 },
        Action::Log,
    ]
    .iter()
    .map(Action::name)
    .find(|n| *n == stored)
}

/// Splits a cursor into its generation and stream id; `None` for anything else.
fn split_cursor(text: &str) -> Option<(&str, &str)> {
    let (generation, id) = text.split_once('-')?;
    Cursor::parse(&format!("{generation}-0"))?;
    let (ms, seq) = id.split_once('-')?;
    // A stream id's parts are 64-bit: a larger one would fail the script, not be a
    // cursor too old.
    let part = |s: &str| s.bytes().all(|b| b.is_ascii_digit()) && s.parse::<u64>().is_ok();
    (part(ms) && part(seq)).then_some((generation, id))
}

/// Connects to `url` with bounded connect and response timeouts; the connection
/// reconnects on its own after Redis comes back.
async fn connect(url: &str) -> Result<ConnectionManager, StoreError> {
    let client = redis::Client::open(url)
        .map_err(|e| StoreError::Unavailable(format!("invalid Redis URL: {e}")))?;
    let config = ConnectionManagerConfig::new()
        .set_connection_timeout(CONNECT_TIMEOUT)
        .set_response_timeout(RESPONSE_TIMEOUT)
        // Fail fast while Redis is down (callers answer 503 and ask again); the next
        // call reconnects.
        .set_number_of_retries(0);
    ConnectionManager::new_with_config(client, config)
        .await
        .map_err(|e| StoreError::Unavailable(format!("cannot reach Redis: {e}")))
}

impl Shared {
    async fn run<T: redis::FromRedisValue>(
        &self,
        script: &Script,
        extra: &[String],
    ) -> Result<T, StoreError> {
        let mut inv = script.prepare_invoke();
        for k in &self.keys {
            inv.key(k);
        }
        inv.arg(Cursor::new_generation())
            .arg(self.retention)
            .arg(millis(Utc::now()));
        for a in extra {
            inv.arg(a);
        }
        let mut conn = self.conn.clone();
        inv.invoke_async(&mut conn).await.map_err(unavailable)
    }

    /// A write through this instance reported the store's state.
    fn report(&self, state: String) {
        let mut seen = self.seen.lock();
        seen.epoch += 1;
        if seen.state != state {
            seen.state = state;
            drop(seen);
            self.changed.send_modify(|v| *v = v.wrapping_add(1));
        }
    }

    async fn look(&self) -> Result<String, StoreError> {
        let mut conn = self.conn.clone();
        let (generation, seq): (Option<String>, Option<String>) = redis::cmd("MGET")
            .arg(&self.keys[5])
            .arg(&self.keys[6])
            .query_async(&mut conn)
            .await
            .map_err(unavailable)?;
        Ok(format!(
            "{}:{}",
            generation.unwrap_or_default(),
            seq.unwrap_or_else(|| "0".into())
        ))
    }
}

/// Wakes local followers for changes written through other instances; ends when the
/// store is dropped.
async fn watch_changes(shared: Weak<Shared>) {
    loop {
        tokio::time::sleep(WATCH_INTERVAL).await;
        let Some(s) = shared.upgrade() else {
            return;
        };
        let epoch = s.seen.lock().epoch;
        let Ok(state) = s.look().await else {
            continue;
        };
        let mut seen = s.seen.lock();
        if seen.epoch == epoch && seen.state != state {
            seen.state = state;
            drop(seen);
            s.changed.send_modify(|v| *v = v.wrapping_add(1));
        }
    }
}

impl RedisMitigations {
    /// Connects to Redis at `url`; the store's keys all start with `{prefix}:mit:` (the
    /// braces keep them in one cluster slot). Keeps at least `retention` changes.
    pub async fn open(
        url: &str,
        prefix: &str,
        retention: usize,
    ) -> Result<RedisMitigations, StoreError> {
        let conn = connect(url).await?;
        let key = |name: &str| format!("{{{prefix}}}:mit:{name}");
        let shared = Arc::new(Shared {
            conn,
            keys: [
                key("by_id"),
                key("expiry"),
                key("entity_of"),
                key("action_of"),
                key("changes"),
                key("generation"),
                key("seq"),
                key("entity:"),
                key("ids"),
                key("outbox"),
                key("outbox_seq"),
                key("outbox_lease"),
                key("restoring"),
                key("touched_ids"),
                key("touched_entities"),
                key("touched_all"),
                key("restore_due"),
            ],
            retention: retention.max(1),
            scripts: Scripts::new(),
            seen: Mutex::new(Seen {
                epoch: 0,
                state: String::new(),
            }),
            changed: watch::channel(0).0,
        });
        let state = shared.look().await?;
        shared.seen.lock().state = state;
        tokio::spawn(watch_changes(Arc::downgrade(&shared)));
        Ok(RedisMitigations { shared })
    }

    async fn jsons(
        &self,
        script: &Script,
        extra: &[String],
    ) -> Result<Vec<Mitigation>, StoreError> {
        let now = Utc::now();
        let raw: Vec<String> = self.shared.run(script, extra).await?;
        let mut out = Vec::with_capacity(raw.len());
        for json in raw {
            let Some(m) = decode(&json) else { continue };
            if m.is_active(now) {
                out.push(m);
            }
        }
        Ok(out)
    }

    /// Runs the changes script: deltas after the cursor (`after` is `None`), the
    /// snapshot page after id `after`, or the first page of a new snapshot.
    async fn page(
        &self,
        generation: &str,
        id: &str,
        after: Option<&str>,
        limit: usize,
    ) -> Result<DeltaPage, StoreError> {
        let raw: Vec<String> = self
            .shared
            .run(
                &self.shared.scripts.changes,
                &[
                    generation.into(),
                    id.into(),
                    limit.max(1).to_string(),
                    after.map(|a| format!(">{a}")).unwrap_or_default(),
                ],
            )
            .await?;
        let mut parts = raw.into_iter();
        let (Some(kind), Some(cursor), Some(more), Some(total)) =
            (parts.next(), parts.next(), parts.next(), parts.next())
        else {
            return Err(garbled("a delta page without a cursor"));
        };
        let snapshot = kind == "s";
        let now = Utc::now();
        let mut changes = Vec::new();
        for part in parts {
            if let Some(json) = part.strip_prefix('u') {
                let Some(m) = decode(json) else { continue };
                // A snapshot holds what is active now; a delta replays what happened.
                if !snapshot || m.is_active(now) {
                    changes.push(Change::Upsert { mitigation: m });
                }
            } else if let Some(id) = part.strip_prefix('r') {
                changes.push(Change::Remove { id: id.to_string() });
            }
        }
        Ok(DeltaPage {
            cursor,
            snapshot,
            changes,
            more: (!more.is_empty()).then_some(more),
            total: total.parse().ok(),
            restoring: false,
        })
    }

    /// Applies `write`, appending `log`'s entries to the outbox in the same script.
    async fn apply(&self, write: Write<'_>, log: Option<&LogAppend>) -> Result<Logged, StoreError> {
        let mut args = match log {
            None => vec![String::new(), "0".into(), "0".into()],
            Some(log) => {
                let mode = if log.drop_oldest { "drop" } else { "reject" };
                let mut args = vec![
                    mode.into(),
                    log.capacity.to_string(),
                    log.entries.len().to_string(),
                ];
                args.extend(log.entries.iter().cloned());
                args
            }
        };
        let scripts = &self.shared.scripts;
        let script = match write {
            Write::Publish(mitigations) => {
                put_args(&mut args, mitigations)?;
                &scripts.publish
            }
            Write::RevokeId(id) => {
                args.extend(["id".into(), id.into()]);
                &scripts.revoke
            }
            Write::RevokeEntity(entity) => {
                args.extend(["entity".into(), entity.to_string()]);
                &scripts.revoke
            }
            Write::Clear => &scripts.clear,
        };
        let raw: Vec<String> = self.shared.run(script, &args).await?;
        let mut parts = raw.into_iter();
        match parts.next().as_deref() {
            Some("ok") => {}
            Some("full") => return Ok(Logged::Full),
            _ => return Err(garbled("a write's outcome")),
        }
        let changed = count(parts.next(), "a count")?;
        let cursor = match write {
            Write::Publish(_) => Some(parts.next().ok_or_else(|| garbled("a cursor"))?),
            _ => None,
        };
        let state = parts.next().ok_or_else(|| garbled("the store's state"))?;
        self.shared.report(state);
        Ok(Logged::Done {
            changed,
            cursor,
            dropped: count(parts.next(), "a count of dropped entries")?,
            pending: count(parts.next(), "the outbox's length")?,
        })
    }

    /// A write without an outbox entry: how many it changed, and a publish's cursor.
    async fn unlogged(&self, write: Write<'_>) -> Result<(usize, Option<String>), StoreError> {
        match self.apply(write, None).await? {
            Logged::Done {
                changed, cursor, ..
            } => Ok((changed, cursor)),
            Logged::Full => Err(garbled("a full outbox for a write without entries")),
        }
    }
}

#[async_trait::async_trait]
impl Journal for RedisMitigations {
    async fn write(&self, write: Write<'_>, log: &LogAppend) -> Result<Logged, StoreError> {
        self.apply(write, Some(log)).await
    }

    async fn claim(&self, owner: &str, lease: Duration, limit: usize) -> Result<Claim, StoreError> {
        let raw: Vec<String> = self
            .shared
            .run(
                &self.shared.scripts.claim,
                &[
                    owner.into(),
                    lease.as_millis().max(1).to_string(),
                    limit.max(1).to_string(),
                ],
            )
            .await?;
        outbox::parse_claim(raw).map_err(garbled_outbox)
    }

    async fn ack(
        &self,
        owner: &str,
        delivered: &[u64],
        lease: Duration,
    ) -> Result<(bool, usize), StoreError> {
        let args: Vec<String> = [owner.to_string(), lease.as_millis().max(1).to_string()]
            .into_iter()
            .chain(delivered.iter().map(u64::to_string))
            .collect();
        let answer: (String, String) = self.shared.run(&self.shared.scripts.ack, &args).await?;
        outbox::parse_ack(answer).map_err(garbled_outbox)
    }

    async fn release(&self, owner: &str) -> Result<(), StoreError> {
        let _: i64 = self
            .shared
            .run(&self.shared.scripts.release, &[owner.into()])
            .await?;
        Ok(())
    }

    async fn begin_restore(&self, owner: &str, lease: Duration) -> Result<u64, StoreError> {
        let lease = lease.as_millis().max(1).to_string();
        let seq: String = self
            .shared
            .run(&self.shared.scripts.restore_begin, &[owner.into(), lease])
            .await?;
        seq.parse()
            .map_err(|_| garbled("the outbox's entry number"))
    }

    async fn outbox_head(&self) -> Result<Option<u64>, StoreError> {
        let head: String = self
            .shared
            .run(&self.shared.scripts.outbox_head, &[])
            .await?;
        if head.is_empty() {
            return Ok(None);
        }
        head.parse()
            .map(Some)
            .map_err(|_| garbled("the outbox's first entry number"))
    }

    async fn restore_page(
        &self,
        owner: &str,
        lease: Duration,
        mitigations: &[Mitigation],
    ) -> Result<RestorePage, StoreError> {
        let mut args = vec![owner.to_string(), lease.as_millis().max(1).to_string()];
        put_args(&mut args, mitigations)?;
        let raw: Vec<String> = self
            .shared
            .run(&self.shared.scripts.restore_page, &args)
            .await?;
        let mut parts = raw.into_iter();
        match parts.next().as_deref() {
            Some("lapsed") => Ok(RestorePage::Lapsed),
            Some("cleared") => Ok(RestorePage::Cleared),
            Some("ok") => {
                let published = count(parts.next(), "a count")?;
                let state = parts.next().ok_or_else(|| garbled("the store's state"))?;
                self.shared.report(state);
                Ok(RestorePage::Published(published))
            }
            _ => Err(garbled("a restore page's outcome")),
        }
    }

    async fn end_restore(&self, owner: &str, finished: bool) -> Result<(), StoreError> {
        let finished = if finished { "1" } else { "0" };
        let _: i64 = self
            .shared
            .run(
                &self.shared.scripts.restore_end,
                &[owner.into(), finished.into()],
            )
            .await?;
        Ok(())
    }

    async fn restore_orphaned(&self) -> Result<bool, StoreError> {
        let orphaned: i64 = self
            .shared
            .run(&self.shared.scripts.restore_orphaned, &[])
            .await?;
        Ok(orphaned == 1)
    }

    async fn restore_due(&self) -> Result<bool, StoreError> {
        let mut conn = self.shared.conn.clone();
        redis::cmd("EXISTS")
            .arg(&self.shared.keys[16])
            .query_async::<i64>(&mut conn)
            .await
            .map(|n| n == 1)
            .map_err(unavailable)
    }
}

#[async_trait::async_trait]
impl MitigationStore for RedisMitigations {
    fn kind(&self) -> &'static str {
        "redis"
    }

    /// A small write, not a `PING`: a Redis out of memory under `noeviction`, or a
    /// read-only replica, answers `PING` while refusing every write.
    async fn ping(&self) -> Result<(), StoreError> {
        let mut conn = self.shared.conn.clone();
        redis::cmd("SET")
            .arg(format!("{}:readiness", self.shared.keys[6]))
            .arg(1)
            .arg("PX")
            .arg(60_000)
            .query_async::<()>(&mut conn)
            .await
            .map_err(unavailable)
    }

    async fn publish(&self, mitigations: Vec<Mitigation>) -> Result<Published, StoreError> {
        let (accepted, cursor) = self.unlogged(Write::Publish(&mitigations)).await?;
        Ok(Published {
            accepted,
            cursor: cursor.unwrap_or_default(),
        })
    }

    async fn active(&self, kind: Option<&str>, limit: usize) -> Result<ActivePage, StoreError> {
        let mut matching = self.jsons(&self.shared.scripts.active, &[]).await?;
        matching.retain(|m| kind.is_none_or(|k| m.entity.kind() == k));
        let total = matching.len();
        matching.sort_by(newest_first);
        matching.truncate(limit);
        Ok(ActivePage {
            mitigations: matching,
            total,
        })
    }

    async fn for_entity(&self, entity: &EntityKey) -> Result<Vec<Mitigation>, StoreError> {
        let mut keys = vec![entity.to_string()];
        if let EntityKey::Ip(ip) = entity {
            let bits = match ip {
                IpAddr::V4(_) => 32,
                IpAddr::V6(_) => 128,
            };
            keys.extend(
                (0..=bits).filter_map(|len| EntityKey::network(*ip, len).map(|n| n.to_string())),
            );
        }
        let mut found = self.jsons(&self.shared.scripts.for_entity, &keys).await?;
        found.sort_by(newest_first);
        Ok(found)
    }

    async fn revoke_id(&self, id: &str) -> Result<usize, StoreError> {
        Ok(self.unlogged(Write::RevokeId(id)).await?.0)
    }

    async fn revoke_entity(&self, entity: &EntityKey) -> Result<usize, StoreError> {
        Ok(self.unlogged(Write::RevokeEntity(entity)).await?.0)
    }

    async fn clear(&self) -> Result<usize, StoreError> {
        Ok(self.unlogged(Write::Clear).await?.0)
    }

    async fn rebase(&self) -> Result<(), StoreError> {
        let state: String = self.shared.run(&self.shared.scripts.rebase, &[]).await?;
        self.shared.report(state);
        Ok(())
    }

    async fn changes(&self, cursor: Option<&str>, limit: usize) -> Result<DeltaPage, StoreError> {
        let (generation, id) = cursor.and_then(split_cursor).unwrap_or(("", ""));
        self.page(generation, id, None, limit).await
    }

    async fn snapshot_page(
        &self,
        cursor: &str,
        after: &str,
        limit: usize,
    ) -> Result<DeltaPage, StoreError> {
        let (generation, id) = split_cursor(cursor).unwrap_or(("", ""));
        self.page(generation, id, Some(after), limit).await
    }

    fn subscribe(&self) -> watch::Receiver<u64> {
        self.shared.changed.subscribe()
    }

    async fn sweep(&self) -> Result<usize, StoreError> {
        self.shared.run(&self.shared.scripts.sweep, &[]).await
    }

    async fn counts(&self) -> Result<BTreeMap<&'static str, u64>, StoreError> {
        let raw: Vec<String> = self.shared.run(&self.shared.scripts.counts, &[]).await?;
        let mut counts = BTreeMap::new();
        for pair in raw.chunks(2) {
            if let [name, n] = pair
                && let (Some(name), Ok(n)) = (action_name(name), n.parse::<u64>())
            {
                counts.insert(name, n);
            }
        }
        Ok(counts)
    }

    fn journal(self: Arc<Self>) -> Option<Arc<dyn Journal>> {
        Some(self)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cursors_split_into_generation_and_stream_id() {
        assert_eq!(
            split_cursor("0123abcd-1712-3"),
            Some(("0123abcd", "1712-3"))
        );
        for bad in [
            "",
            "abc",
            "abc-1",
            "abc-1-",
            "abc-1-x",
            "a b-1-2",
            "-1-2",
            "abc-+1-2",
            "0123abcd-99999999999999999999-0",
        ] {
            assert_eq!(split_cursor(bad), None, "{bad}");
        }
    }

    #[test]
    fn stored_action_names_map_to_static_ones() {
        for name in ["block", "throttle", "tarpit", "challenge", "log"] {
            assert_eq!(action_name(name), Some(name));
        }
        assert_eq!(action_name("nonsense"), None);
    }
}
