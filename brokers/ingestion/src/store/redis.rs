//! The Redis queue: one Redis Stream with a consumer group, shared by every broker
//! instance that points at the same Redis and key prefix.
//!
//! Each operation is one Lua script, so it is atomic across instances. Leases are kept
//! beside the group's pending list: the owner and attempt count of each leased item in
//! hashes, and its lease expiry in a sorted set, because a lease's length is chosen per
//! claim (a single `XAUTOCLAIM` idle threshold cannot express that). A claim takes
//! expired leases back with `XCLAIM` before reading new items with `XREADGROUP`; acked
//! items are `XACK`ed and `XDEL`eted, so `XLEN` is the number of items held. Items whose
//! lease expired after `max_attempts` claims move to a dead-letter stream.

use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use esper_protocol::RequestEvent;
use esper_protocol::ingestion::{ClaimedItem, ConsumerStatus, ItemInfo, ItemState, QueueStatus};
use redis::Script;
use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use serde::Deserialize;
use serde::de::DeserializeOwned;
use tokio::sync::Notify;
use tokio::time::Instant;

use super::{ClaimSpec, Enqueued, QueueStore, Refusal, StoreError};

/// How often a waiting claim looks at the stream again for items another instance
/// enqueued (items enqueued through this instance wake it at once).
const POLL_INTERVAL: Duration = Duration::from_millis(25);
/// Consumers with nothing leased are forgotten after this long without a claim or ack.
const CONSUMER_FORGET_AFTER: Duration = Duration::from_secs(600);
/// Most dead letters kept; the oldest go first.
const DEAD_LETTER_CAP: usize = 10_000;
/// Waiting items deleted per script call while purging, so Redis is never held long.
const PURGE_CHUNK: usize = 10_000;
/// How long a Redis call may take before the store reports Redis unavailable.
const RESPONSE_TIMEOUT: Duration = Duration::from_secs(2);
const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);

/// Declarations every script starts with: the keys, the group, and helpers.
const PRELUDE: &str = r#"
local S, OWNER, ATT, EXP, STATS, PAUSED, DEAD, DIDX, CONS =
  KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5], KEYS[6], KEYS[7], KEYS[8], KEYS[9]
local G = 'workers'
local function ensure()
  if redis.call('EXISTS', S) == 0 then
    redis.call('XGROUP', 'CREATE', S, G, '0', 'MKSTREAM')
  end
end
local function now_ms()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end
local function pending_count()
  return tonumber(redis.call('XPENDING', S, G)[1])
end
local function field(fields, name)
  for i = 1, #fields, 2 do
    if fields[i] == name then return fields[i + 1] end
  end
  return nil
end
local function last_delivered()
  for _, g in ipairs(redis.call('XINFO', 'GROUPS', S)) do
    if field(g, 'name') == G then return field(g, 'last-delivered-id') end
  end
  return '0-0'
end
local function forget(id)
  redis.call('HDEL', OWNER, id)
  redis.call('HDEL', ATT, id)
  redis.call('ZREM', EXP, id)
end
"#;

const ENQUEUE: &str = r#"
ensure()
local cap = tonumber(ARGV[1])
local n = #ARGV - 1
local held = redis.call('XLEN', S)
if n == 0 then return cjson.encode({depth = held - pending_count()}) end
local reason = nil
if redis.call('EXISTS', PAUSED) == 1 then reason = 'paused'
elseif n > cap then reason = 'too_large'
elseif held + n > cap then reason = 'full' end
if reason then
  redis.call('HINCRBY', STATS, 'rejected', n)
  return cjson.encode({refused = reason, held = held})
end
for i = 2, #ARGV do redis.call('XADD', S, '*', 'e', ARGV[i]) end
redis.call('HINCRBY', STATS, 'ingested', n)
return cjson.encode({depth = held + n - pending_count()})
"#;

const CLAIM: &str = r#"
ensure()
local consumer, max, lease = ARGV[1], tonumber(ARGV[2]), tonumber(ARGV[3])
local threshold, max_attempts, dead_cap = tonumber(ARGV[4]), tonumber(ARGV[5]), tonumber(ARGV[6])
local now = now_ms()
redis.call('HSET', CONS, consumer, now)

-- An expired lease that used up its attempts goes to the dead-letter stream: `true`
-- when it did.
local function dead_letter(id)
  local attempts = tonumber(redis.call('HGET', ATT, id) or '0')
  if attempts < max_attempts then return false end
  local r = redis.call('XRANGE', S, id, id)
  if #r > 0 then
    local did = redis.call('XADD', DEAD, '*', 'id', id, 'e', field(r[1][2], 'e'),
      'attempts', attempts, 'consumer', redis.call('HGET', OWNER, id) or '', 'at', now)
    redis.call('HSET', DIDX, id, did)
    redis.call('HINCRBY', STATS, 'dead_lettered', 1)
  end
  redis.call('XACK', S, G, id)
  redis.call('XDEL', S, id)
  forget(id)
  return true
end
local function trim_dead()
  while redis.call('XLEN', DEAD) > dead_cap do
    local oldest = redis.call('XRANGE', DEAD, '-', '+', 'COUNT', 1)[1]
    redis.call('HDEL', DIDX, field(oldest[2], 'id'))
    redis.call('XDEL', DEAD, oldest[1])
  end
end

for _, id in ipairs(redis.call('ZRANGEBYSCORE', EXP, '-inf', now, 'LIMIT', 0, 1000)) do
  dead_letter(id)
end
trim_dead()

local waiting = redis.call('XLEN', S) - pending_count()
local available = waiting + redis.call('ZCOUNT', EXP, '-inf', now)
if available < threshold then return cjson.encode({available = available}) end

-- Lapsed leases are handed out before new items, oldest first, by id: leases differ in
-- length, so the order they ran out in is not the queue's. Sorted among the first
-- max(max, 1000) to run out: exact unless more than that many lapsed at once.
local lapsed = {}
local look = math.max(max, 1000)
for i, id in ipairs(redis.call('ZRANGEBYSCORE', EXP, '-inf', now, 'LIMIT', 0, look)) do
  local ms, sq = string.match(id, '(%d+)-(%d+)')
  lapsed[i] = {tonumber(ms), tonumber(sq), id}
end
table.sort(lapsed, function(a, b)
  if a[1] ~= b[1] then return a[1] < b[1] end
  return a[2] < b[2]
end)
local out = {}
local reclaimed = 0
for _, l in ipairs(lapsed) do
  if #out >= max then break end
  local id = l[3]
  -- The pass above looks at the first thousand only: no item is handed out once more
  -- than its attempts allow, however many leases ran out.
  if dead_letter(id) then
    trim_dead()
  else
    local r = redis.call('XCLAIM', S, G, consumer, 0, id)
    if #r > 0 and r[1] then
      local attempts = redis.call('HINCRBY', ATT, id, 1)
      redis.call('HSET', OWNER, id, consumer)
      redis.call('ZADD', EXP, now + lease, id)
      out[#out + 1] = {id = id, attempts = attempts, e = field(r[1][2], 'e')}
      reclaimed = reclaimed + 1
    else
      -- The entry is gone (purged by hand): drop what is left of its lease.
      redis.call('XACK', S, G, id)
      forget(id)
    end
  end
end
if reclaimed > 0 then redis.call('HINCRBY', STATS, 'reclaimed', reclaimed) end
if #out < max then
  local r = redis.call('XREADGROUP', 'GROUP', G, consumer, 'COUNT', max - #out, 'STREAMS', S, '>')
  if r then
    for _, entry in ipairs(r[1][2]) do
      local id = entry[1]
      redis.call('HSET', ATT, id, 1)
      redis.call('HSET', OWNER, id, consumer)
      redis.call('ZADD', EXP, now + lease, id)
      out[#out + 1] = {id = id, attempts = 1, e = field(entry[2], 'e')}
    end
  end
end
return cjson.encode({items = out, leased = true})
"#;

const ACK: &str = r#"
ensure()
local consumer = ARGV[1]
local acked, seen = 0, {}
for i = 2, #ARGV do
  local id = ARGV[i]
  if not seen[id] and redis.call('HGET', OWNER, id) == consumer then
    seen[id] = true
    redis.call('XACK', S, G, id)
    redis.call('XDEL', S, id)
    forget(id)
    acked = acked + 1
  end
end
if acked > 0 then redis.call('HINCRBY', STATS, 'acked', acked) end
redis.call('HSET', CONS, consumer, now_ms())
return acked
"#;

const STATUS: &str = r#"
ensure()
local forget_after = tonumber(ARGV[1])
local now = now_ms()
local summary = redis.call('XPENDING', S, G)
local leased_by = {}
if summary[4] then
  for _, c in ipairs(summary[4]) do leased_by[c[1]] = tonumber(c[2]) end
end
local consumers = {}
local seen = redis.call('HGETALL', CONS)
for i = 1, #seen, 2 do
  local name, at = seen[i], tonumber(seen[i + 1])
  local leased = leased_by[name] or 0
  if leased == 0 and now - at > forget_after then
    redis.call('HDEL', CONS, name)
    redis.call('XGROUP', 'DELCONSUMER', S, G, name)
  else
    consumers[#consumers + 1] = {consumer = name, leased = leased, last_seen = at}
  end
end
local stats = {}
local raw = redis.call('HGETALL', STATS)
for i = 1, #raw, 2 do stats[raw[i]] = tonumber(raw[i + 1]) end
local pending = tonumber(summary[1])
return cjson.encode({
  depth = redis.call('XLEN', S) - pending, leased = pending,
  paused = redis.call('EXISTS', PAUSED) == 1, dead = redis.call('XLEN', DEAD),
  stats = stats, consumers = consumers})
"#;

const ITEMS: &str = r#"
ensure()
local state, limit = ARGV[1], tonumber(ARGV[2])
local out = {}
if state == 'pending' or state == 'all' then
  for _, entry in ipairs(redis.call('XRANGE', S, '(' .. last_delivered(), '+', 'COUNT', limit)) do
    out[#out + 1] = {id = entry[1], state = 'pending',
      attempts = tonumber(redis.call('HGET', ATT, entry[1]) or '0'), e = field(entry[2], 'e')}
  end
end
if state == 'leased' or state == 'all' then
  for _, p in ipairs(redis.call('XPENDING', S, G, '-', '+', limit)) do
    local r = redis.call('XRANGE', S, p[1], p[1])
    if #r > 0 then
      out[#out + 1] = {id = p[1], state = 'leased', consumer = p[2],
        attempts = tonumber(redis.call('HGET', ATT, p[1]) or '1'),
        expires = tonumber(redis.call('ZSCORE', EXP, p[1]) or '0'), e = field(r[1][2], 'e')}
    end
  end
end
if state == 'dead_letter' or state == 'all' then
  for _, entry in ipairs(redis.call('XRANGE', DEAD, '-', '+', 'COUNT', limit)) do
    local f = entry[2]
    out[#out + 1] = {id = field(f, 'id'), state = 'dead_letter', consumer = field(f, 'consumer'),
      attempts = tonumber(field(f, 'attempts')), e = field(f, 'e')}
  end
end
return cjson.encode({items = out})
"#;

const ITEM: &str = r#"
ensure()
local id = ARGV[1]
local r = redis.call('XRANGE', S, id, id)
if #r > 0 then
  local p = redis.call('XPENDING', S, G, id, id, 1)
  local attempts = tonumber(redis.call('HGET', ATT, id) or '0')
  if #p > 0 then
    return cjson.encode({items = {{id = id, state = 'leased', consumer = p[1][2],
      attempts = attempts, expires = tonumber(redis.call('ZSCORE', EXP, id) or '0'),
      e = field(r[1][2], 'e')}}})
  end
  return cjson.encode({items = {{id = id, state = 'pending', attempts = attempts,
    e = field(r[1][2], 'e')}}})
end
local did = redis.call('HGET', DIDX, id)
if did then
  local d = redis.call('XRANGE', DEAD, did, did)
  if #d > 0 then
    local f = d[1][2]
    return cjson.encode({items = {{id = id, state = 'dead_letter', consumer = field(f, 'consumer'),
      attempts = tonumber(field(f, 'attempts')), e = field(f, 'e')}}})
  end
end
return cjson.encode({items = {}})
"#;

const PURGE: &str = r#"
ensure()
local n = 0
for _, entry in ipairs(redis.call('XRANGE', S, '(' .. last_delivered(), '+', 'COUNT', tonumber(ARGV[1]))) do
  redis.call('XDEL', S, entry[1])
  redis.call('HDEL', ATT, entry[1])
  n = n + 1
end
if ARGV[2] == '1' then
  n = n + redis.call('XLEN', DEAD)
  redis.call('DEL', DEAD, DIDX)
end
return n
"#;

const SET_PAUSED: &str = r#"
ensure()
if ARGV[1] == '1' then redis.call('SET', PAUSED, '1') else redis.call('DEL', PAUSED) end
return 1
"#;

struct Scripts {
    enqueue: Script,
    claim: Script,
    ack: Script,
    status: Script,
    items: Script,
    item: Script,
    purge: Script,
    set_paused: Script,
}

impl Scripts {
    fn new() -> Scripts {
        let s = |body: &str| Script::new(&format!("{PRELUDE}{body}"));
        Scripts {
            enqueue: s(ENQUEUE),
            claim: s(CLAIM),
            ack: s(ACK),
            status: s(STATUS),
            items: s(ITEMS),
            item: s(ITEM),
            purge: s(PURGE),
            set_paused: s(SET_PAUSED),
        }
    }
}

/// A bounded, leased work queue on Redis Streams, shared by every broker instance that
/// uses the same Redis and key prefix.
pub struct RedisQueue {
    conn: ConnectionManager,
    keys: [String; 9],
    capacity: u64,
    max_attempts: u32,
    scripts: Arc<Scripts>,
    /// Woken on every enqueue through this instance, so local long-polls answer at once.
    arrivals: Notify,
}

/// Readiness: a small write next to `key`, not a `PING`. A Redis out of memory under
/// `noeviction` (the setting brokers need), or a replica made read-only, still answers
/// `PING` while it refuses every write a broker makes.
async fn write_probe(conn: &mut ConnectionManager, key: &str) -> Result<(), StoreError> {
    redis::cmd("SET")
        .arg(format!("{key}:readiness"))
        .arg(1)
        .arg("PX")
        .arg(60_000)
        .query_async::<()>(conn)
        .await
        .map_err(unavailable)
}

/// Connects to `url` with bounded connect and response timeouts; the connection
/// reconnects on its own after Redis comes back.
pub async fn connect(url: &str) -> Result<ConnectionManager, StoreError> {
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

fn unavailable(e: redis::RedisError) -> StoreError {
    StoreError::Unavailable(format!("Redis: {e}"))
}

fn decode<T: DeserializeOwned>(text: &str) -> Result<T, StoreError> {
    serde_json::from_str(text)
        .map_err(|e| StoreError::Unavailable(format!("unexpected answer from Redis: {e}")))
}

/// Lua's JSON encoder writes an empty table as `{}`; read that as an empty list.
fn lua_list<'de, D, T>(d: D) -> Result<Vec<T>, D::Error>
where
    D: serde::Deserializer<'de>,
    T: Deserialize<'de>,
{
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum ListOrEmpty<T> {
        List(Vec<T>),
        Empty {},
    }
    Ok(match ListOrEmpty::deserialize(d)? {
        ListOrEmpty::List(v) => v,
        ListOrEmpty::Empty {} => Vec::new(),
    })
}

#[derive(Deserialize)]
struct EnqueueReply {
    #[serde(default)]
    depth: u64,
    refused: Option<String>,
    #[serde(default)]
    held: u64,
}

#[derive(Deserialize)]
struct ClaimReply {
    #[serde(default, deserialize_with = "lua_list")]
    items: Vec<RawItem>,
    #[serde(default)]
    leased: bool,
    #[serde(default)]
    available: u64,
}

#[derive(Deserialize)]
struct RawItem {
    id: String,
    #[serde(default)]
    state: String,
    #[serde(default)]
    attempts: u32,
    #[serde(default)]
    consumer: Option<String>,
    #[serde(default)]
    expires: Option<i64>,
    e: String,
}

#[derive(Deserialize)]
struct ItemsReply {
    #[serde(default, deserialize_with = "lua_list")]
    items: Vec<RawItem>,
}

#[derive(Deserialize)]
struct StatusReply {
    depth: u64,
    leased: u64,
    paused: bool,
    dead: u64,
    #[serde(default)]
    stats: std::collections::HashMap<String, u64>,
    #[serde(default, deserialize_with = "lua_list")]
    consumers: Vec<RawConsumer>,
}

#[derive(Deserialize)]
struct RawConsumer {
    consumer: String,
    leased: u64,
    last_seen: i64,
}

fn from_ms(ms: i64) -> DateTime<Utc> {
    DateTime::from_timestamp_millis(ms).unwrap_or(DateTime::<Utc>::MIN_UTC)
}

/// `MS-SEQ`, digits only: anything else is no item of ours (and Redis would refuse it).
fn stream_id(id: &str) -> Option<(u64, u64)> {
    let (ms, seq) = id.split_once('-')?;
    let digits = |s: &str| !s.is_empty() && s.len() <= 20 && s.bytes().all(|b| b.is_ascii_digit());
    if !digits(ms) || !digits(seq) {
        return None;
    }
    Some((ms.parse().ok()?, seq.parse().ok()?))
}

fn event(raw: &str) -> Result<RequestEvent, StoreError> {
    decode(raw)
}

fn unreadable(item_id: &str, e: &StoreError) {
    tracing::warn!(item_id, error = %e, "a queued event this broker cannot read was skipped");
}

impl RawItem {
    fn into_info(self) -> Result<ItemInfo, StoreError> {
        let state = match self.state.as_str() {
            "leased" => ItemState::Leased,
            "dead_letter" => ItemState::DeadLetter,
            _ => ItemState::Pending,
        };
        let enqueued_at = stream_id(&self.id)
            .and_then(|(ms, _)| i64::try_from(ms).ok())
            .map_or(DateTime::<Utc>::MIN_UTC, from_ms);
        Ok(ItemInfo {
            event: event(&self.e)?,
            enqueued_at,
            state,
            attempts: self.attempts,
            consumer: self.consumer.filter(|c| !c.is_empty()),
            lease_expires_at: self.expires.filter(|ms| *ms > 0).map(from_ms),
            item_id: self.id,
        })
    }
}

impl RedisQueue {
    /// Connects to Redis at `url`; the queue's keys all start with `{prefix}:ingest:`
    /// (the braces keep them in one cluster slot).
    pub async fn open(
        url: &str,
        prefix: &str,
        capacity: usize,
        max_attempts: u32,
    ) -> Result<RedisQueue, StoreError> {
        let conn = connect(url).await?;
        let key = |name: &str| format!("{{{prefix}}}:ingest:{name}");
        let queue = RedisQueue {
            conn,
            keys: [
                key("stream"),
                key("owner"),
                key("attempts"),
                key("lease_expiry"),
                key("stats"),
                key("paused"),
                key("dead"),
                key("dead_index"),
                key("consumers"),
            ],
            capacity: capacity as u64,
            max_attempts: max_attempts.max(1),
            scripts: Arc::new(Scripts::new()),
            arrivals: Notify::new(),
        };
        queue.ping().await?;
        Ok(queue)
    }

    async fn run<T: redis::FromRedisValue>(
        &self,
        script: &Script,
        args: &[String],
    ) -> Result<T, StoreError> {
        let mut inv = script.prepare_invoke();
        for k in &self.keys {
            inv.key(k);
        }
        for a in args {
            inv.arg(a);
        }
        let mut conn = self.conn.clone();
        inv.invoke_async(&mut conn).await.map_err(unavailable)
    }

    async fn try_claim(
        &self,
        spec: &ClaimSpec,
        threshold: usize,
    ) -> Result<Result<Vec<ClaimedItem>, u64>, StoreError> {
        let lease_ms = u64::try_from(spec.lease.as_millis()).unwrap_or(u64::MAX);
        let text: String = self
            .run(
                &self.scripts.claim,
                &[
                    spec.consumer.clone(),
                    spec.max.to_string(),
                    lease_ms.to_string(),
                    threshold.to_string(),
                    self.max_attempts.to_string(),
                    DEAD_LETTER_CAP.to_string(),
                ],
            )
            .await?;
        let reply: ClaimReply = decode(&text)?;
        if !reply.leased {
            // Fewer than `threshold` were claimable: nothing was leased.
            return Ok(Err(reply.available));
        }
        let items = reply
            .items
            .into_iter()
            .filter_map(|raw| match event(&raw.e) {
                Ok(event) => Some(ClaimedItem {
                    event,
                    attempts: raw.attempts,
                    item_id: raw.id,
                }),
                Err(e) => {
                    // Written by another version of the broker sharing this Redis, say.
                    // Failing the claim would cost the readable items of the batch their
                    // attempts; left leased, this one lapses and goes to another claim
                    // (an instance that can read it), or to the dead letters.
                    unreadable(&raw.id, &e);
                    None
                }
            })
            .collect();
        Ok(Ok(items))
    }
}

#[async_trait::async_trait]
impl QueueStore for RedisQueue {
    fn kind(&self) -> &'static str {
        "redis"
    }

    fn capacity(&self) -> u64 {
        self.capacity
    }

    async fn ping(&self) -> Result<(), StoreError> {
        let mut conn = self.conn.clone();
        write_probe(&mut conn, &self.keys[4]).await
    }

    async fn enqueue(&self, events: Vec<RequestEvent>) -> Result<Enqueued, StoreError> {
        let n = events.len();
        let mut inv = self.scripts.enqueue.prepare_invoke();
        for k in &self.keys {
            inv.key(k);
        }
        inv.arg(self.capacity);
        for e in &events {
            let json = serde_json::to_string(e)
                .map_err(|e| StoreError::Unavailable(format!("cannot encode an event: {e}")))?;
            inv.arg(json);
        }
        let mut conn = self.conn.clone();
        let text: String = inv.invoke_async(&mut conn).await.map_err(unavailable)?;
        let reply: EnqueueReply = decode(&text)?;
        let reason = match reply.refused.as_deref() {
            None => {
                if n > 0 {
                    self.arrivals.notify_waiters();
                }
                return Ok(Enqueued::Accepted { depth: reply.depth });
            }
            Some("paused") => Refusal::Paused,
            Some("too_large") => Refusal::TooLarge,
            Some(_) => Refusal::Full,
        };
        Ok(Enqueued::Refused {
            reason,
            held: reply.held,
            capacity: self.capacity,
        })
    }

    async fn claim(&self, spec: &ClaimSpec) -> Result<Vec<ClaimedItem>, StoreError> {
        let deadline = Instant::now() + spec.wait;
        let mut linger_until: Option<Instant> = None;
        loop {
            // Registered before looking, so an enqueue between the look and the sleep
            // still wakes us.
            let arrival = self.arrivals.notified();
            tokio::pin!(arrival);
            arrival.as_mut().enable();
            let now = Instant::now();
            let must_answer = now >= deadline || linger_until.is_some_and(|t| now >= t);
            let threshold = if must_answer { 1 } else { spec.max };
            let available = match self.try_claim(spec, threshold).await? {
                Ok(items) => return Ok(items),
                Err(_) if must_answer => return Ok(Vec::new()),
                Err(available) => available,
            };
            if linger_until.is_none() && available > 0 {
                linger_until = Some((Instant::now() + spec.linger).min(deadline));
                continue;
            }
            let wake = linger_until
                .unwrap_or(deadline)
                .min(Instant::now() + POLL_INTERVAL);
            let _ = tokio::time::timeout_at(wake, arrival).await;
        }
    }

    async fn ack(&self, consumer: &str, item_ids: &[String]) -> Result<usize, StoreError> {
        let mut inv = self.scripts.ack.prepare_invoke();
        for k in &self.keys {
            inv.key(k);
        }
        inv.arg(consumer);
        for id in item_ids.iter().filter(|id| stream_id(id).is_some()) {
            inv.arg(id);
        }
        let mut conn = self.conn.clone();
        let acked: usize = inv.invoke_async(&mut conn).await.map_err(unavailable)?;
        Ok(acked)
    }

    async fn status(&self) -> Result<QueueStatus, StoreError> {
        let forget_ms = u64::try_from(CONSUMER_FORGET_AFTER.as_millis()).unwrap_or(u64::MAX);
        let text: String = self
            .run(&self.scripts.status, &[forget_ms.to_string()])
            .await?;
        let reply: StatusReply = decode(&text)?;
        let stat = |name: &str| reply.stats.get(name).copied().unwrap_or(0);
        let mut consumers: Vec<ConsumerStatus> = reply
            .consumers
            .into_iter()
            .map(|c| ConsumerStatus {
                consumer: c.consumer,
                leased: c.leased,
                last_seen: from_ms(c.last_seen),
            })
            .collect();
        consumers.sort_by(|a, b| a.consumer.cmp(&b.consumer));
        Ok(QueueStatus {
            depth: reply.depth,
            leased: reply.leased,
            max_size: self.capacity,
            paused: reply.paused,
            ingested_total: stat("ingested"),
            acked_total: stat("acked"),
            reclaimed_total: stat("reclaimed"),
            rejected_total: stat("rejected"),
            dead_letter: reply.dead,
            dead_lettered_total: stat("dead_lettered"),
            consumers,
        })
    }

    async fn set_paused(&self, paused: bool) -> Result<(), StoreError> {
        let flag = if paused { "1" } else { "0" };
        self.run::<i64>(&self.scripts.set_paused, &[flag.to_string()])
            .await
            .map(|_| ())
    }

    async fn items(
        &self,
        state: Option<ItemState>,
        limit: usize,
    ) -> Result<Vec<ItemInfo>, StoreError> {
        let which = match state {
            None => "all",
            Some(ItemState::Pending) => "pending",
            Some(ItemState::Leased) => "leased",
            Some(ItemState::DeadLetter) => "dead_letter",
        };
        let text: String = self
            .run(&self.scripts.items, &[which.to_string(), limit.to_string()])
            .await?;
        let reply: ItemsReply = decode(&text)?;
        let mut items: Vec<ItemInfo> = reply
            .items
            .into_iter()
            .filter_map(|raw| {
                let id = raw.id.clone();
                raw.into_info().map_err(|e| unreadable(&id, &e)).ok()
            })
            .collect();
        items.sort_by_key(|i| stream_id(&i.item_id));
        items.truncate(limit);
        Ok(items)
    }

    async fn item(&self, item_id: &str) -> Result<Option<ItemInfo>, StoreError> {
        if stream_id(item_id).is_none() {
            return Ok(None);
        }
        let text: String = self.run(&self.scripts.item, &[item_id.to_string()]).await?;
        let reply: ItemsReply = decode(&text)?;
        reply
            .items
            .into_iter()
            .next()
            .map(RawItem::into_info)
            .transpose()
    }

    async fn purge(&self) -> Result<u64, StoreError> {
        let mut total = 0;
        let mut with_dead = "1";
        loop {
            let n: u64 = self
                .run(
                    &self.scripts.purge,
                    &[PURGE_CHUNK.to_string(), with_dead.to_string()],
                )
                .await?;
            total += n;
            with_dead = "0";
            if n < PURGE_CHUNK as u64 {
                return Ok(total);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_stream_ids_are_ours() {
        assert_eq!(stream_id("1712-0"), Some((1712, 0)));
        assert_eq!(stream_id("12"), None);
        assert_eq!(stream_id("-1"), None);
        assert_eq!(stream_id("1-+1"), None);
        assert_eq!(stream_id("a-b"), None);
    }

    #[test]
    fn empty_lua_tables_read_as_empty_lists() {
        let r: ItemsReply = serde_json::from_str(r#"{"items":{}}"#).unwrap();
        assert!(r.items.is_empty());
        let r: ItemsReply = serde_json::from_str(r#"{}"#).unwrap();
        assert!(r.items.is_empty());
    }
}
