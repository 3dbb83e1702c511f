-- Engine state on Redis: the memory backend's algorithm (eval/memory.rs, window.rs,
-- state.rs) run inside Redis, so that every worker shares one state and each batch
-- step is atomic. ARGV[1] is the key prefix, ARGV[2] the call's JSON arguments. The
-- outbox functions (outbox_append, ...) come before this text, from esper_protocol.
--
-- Keys (all with a TTL but the outbox's, which holds records until they are delivered):
--   P:e:{pk}:{entity}  hash: w (window "bucket=weight;..."), dh (distinct head), lt
--                      (last touch), cu/cb/lv/of/lo (decision), sr (sequence; ss/sm/st in its older form)
--   P:d:{pk}:{entity}  zset: distinct value -> newest sub-bucket
--   P:ix:{pk}          zset: entity -> the time it becomes idle (for cleanup, eviction)
--   P:pols             set of policy keys with state
--   P:fl               hash: event id -> receipt in flight
--   P:ids              zset: processed event id -> when it is forgotten
--   P:rc               zset: receipt -> lease deadline (past it, the receipt is undone)
--   P:u:{rid}          the receipt's undo log (JSON)
--   P:seq, P:st        receipt counter; eviction counters
--   P:log, P:log_seq   the decision log's outbox ("N record"), its record counter
--   P:log_lease        who delivers the outbox (expires with the lease)
local P = ARGV[1]
local A = cjson.decode(ARGV[2])
local now = tonumber(A.now)
local RC, FL, IDS, POLS, SEQ, ST = P .. ':rc', P .. ':fl', P .. ':ids', P .. ':pols', P .. ':seq', P .. ':st'
local LOG, LOGSEQ, LOGLEASE = P .. ':log', P .. ':log_seq', P .. ':log_lease'

local function fmt(x) return string.format('%.17g', x) end

-- Sets a key's expiry to at least `ms` from now.
local function extend(key, ms)
  ms = math.max(math.floor(ms), 1000)
  local t = redis.call('PTTL', key)
  if t == -1 or (t >= 0 and t < ms) then redis.call('PEXPIRE', key, ms) end
end

local function reached(v, th) return v >= th - 1e-9 * math.max(th, 1) end

-- Rust's f64::powi (compiler-rt's __powidf2), so grown ttls match the memory backend.
local function powi(a, b)
  local r = 1.0
  while true do
    if b % 2 == 1 then r = r * a end
    b = math.floor(b / 2)
    if b == 0 then break end
    a = a * a
  end
  return r
end

-- A sequence's steps (state.rs's SeqProgress::Steps) as text: per step, runs
-- "start:count" joined by ',', steps joined by '|'.
local function seq_encode(steps)
  local parts = {}
  for i, runs in ipairs(steps) do
    local rs = {}
    for j, r in ipairs(runs) do rs[j] = fmt(r[1]) .. ':' .. fmt(r[2]) end
    parts[i] = table.concat(rs, ',')
  end
  return table.concat(parts, '|')
end
local function seq_decode(text)
  local steps = {}
  for part in string.gmatch(text .. '|', '([^|]*)|') do
    local runs = {}
    for b, n in string.gmatch(part, '([^,:]+):([^,]+)') do
      local bn, nn = tonumber(b), tonumber(n)
      if bn and nn then runs[#runs + 1] = { bn, nn } end
    end
    steps[#steps + 1] = runs
  end
  return steps
end

-- Entity cache for one script call: loaded once, written back once.
local cache = {}
local function ekey(pk, ent) return P .. ':e:' .. pk .. ':' .. ent end
local function dkey(pk, ent) return P .. ':d:' .. pk .. ':' .. ent end

local function load(pk, ent, create, meta)
  local id = pk .. '\n' .. ent
  local e = cache[id]
  if e then return e end
  local raw = redis.call('HGETALL', ekey(pk, ent))
  if #raw == 0 and not create then return nil end
  local h = {}
  for i = 1, #raw, 2 do h[raw[i]] = raw[i + 1] end
  e = { pk = pk, ent = ent, w = {}, lt = tonumber(h.lt) or now,
        cu = tonumber(h.cu) or 0, cb = tonumber(h.cb) or 0, lv = tonumber(h.lv) or 0,
        of = tonumber(h.of) or 0, lo = tonumber(h.lo) or 0, po = tonumber(h.po) or 0,
        dh = tonumber(h.dh),
        win = meta and meta.win or tonumber(h.win) or 0, fresh = (#raw == 0) }
  -- What cannot be read (a hand edit, a bad restore) is left out rather than failing
  -- every batch with a hit on this entity.
  if h.w and h.w ~= '' then
    for b, w in string.gmatch(h.w, '([^=;]+)=([^;]+)') do
      local bn, wn = tonumber(b), tonumber(w)
      if bn and wn then e.w[#e.w + 1] = { bn, wn } end
    end
  end
  local ss, sm, st = tonumber(h.ss), tonumber(h.sm), tonumber(h.st)
  if h.sr then
    e.seq = { steps = seq_decode(h.sr) }
  elseif ss and sm and st then
    e.seq = { step = ss, matched = sm, started = st }
  end
  cache[id] = e
  return e
end

local function idle_at(e, hist)
  -- As the memory backend's is_idle: an entity holding nothing is idle at once.
  local empty = #e.w == 0 and e.seq == nil and redis.call('ZCARD', dkey(e.pk, e.ent)) == 0
  local t = empty and 0 or e.lt + e.win
  if e.cu > t then t = e.cu end
  -- memory.rs's history_end: offenses are remembered past the last decision's end.
  if e.of > 0 and math.max(e.cu, e.lo) + hist > t then t = math.max(e.cu, e.lo) + hist end
  return t
end

local function save_all(hist)
  for _, e in pairs(cache) do
    local k = ekey(e.pk, e.ent)
    local parts = {}
    for i, bw in ipairs(e.w) do parts[i] = fmt(bw[1]) .. '=' .. fmt(bw[2]) end
    redis.call('DEL', k)
    local f = { 'w', table.concat(parts, ';'), 'lt', fmt(e.lt), 'cu', fmt(e.cu), 'cb', fmt(e.cb),
                'lv', fmt(e.lv), 'of', fmt(e.of), 'lo', fmt(e.lo), 'win', fmt(e.win) }
    if e.dh then f[#f + 1] = 'dh'; f[#f + 1] = fmt(e.dh) end
    if e.po ~= 0 then f[#f + 1] = 'po'; f[#f + 1] = fmt(e.po) end
    if e.seq and e.seq.steps then
      f[#f + 1] = 'sr'; f[#f + 1] = seq_encode(e.seq.steps)
    elseif e.seq then
      f[#f + 1] = 'ss'; f[#f + 1] = fmt(e.seq.step)
      f[#f + 1] = 'sm'; f[#f + 1] = fmt(e.seq.matched)
      f[#f + 1] = 'st'; f[#f + 1] = fmt(e.seq.started)
    end
    redis.call('HSET', k, unpack(f))
    local idle = idle_at(e, hist)
    local ttl = math.max(idle - now, 0) + hist
    extend(k, ttl)
    local d = dkey(e.pk, e.ent)
    if redis.call('EXISTS', d) == 1 then extend(d, ttl) end
    local ix = P .. ':ix:' .. e.pk
    redis.call('ZADD', ix, idle, e.ent)
    extend(ix, ttl)
    redis.call('SADD', POLS, e.pk)
    extend(POLS, ttl)
  end
end

-- Sliding window (window.rs's Window): sorted {bucket, weight} pairs.
local function w_head(e) local n = #e.w; if n == 0 then return nil end; return e.w[n][1] end

local function w_sum(e, from)
  local s = 0.0
  for _, bw in ipairs(e.w) do if bw[1] > from then s = s + bw[2] end end
  return s
end

local function w_add(e, b, weight, nb)
  local head = w_head(e); head = head and math.max(head, b) or b
  if b <= head - nb then return nil end
  local placed = false
  for i, bw in ipairs(e.w) do
    if bw[1] == b then bw[2] = bw[2] + weight; placed = true; break end
    if bw[1] > b then table.insert(e.w, i, { b, weight }); placed = true; break end
  end
  if not placed then e.w[#e.w + 1] = { b, weight } end
  while #e.w > 0 and e.w[1][1] <= head - nb do table.remove(e.w, 1) end
  return w_sum(e, -math.huge)
end

local function w_count_at(e, b, nb)
  local head = w_head(e); head = head and math.max(head, b) or b
  return w_sum(e, head - nb)
end

local function w_remove(e, b, weight)
  for i, bw in ipairs(e.w) do
    if bw[1] == b then
      bw[2] = bw[2] - weight
      if bw[2] <= 1e-9 then table.remove(e.w, i) end
      return
    end
  end
end

-- Distinct values (window.rs's DistinctWindow) in a sorted set.
local function d_add(e, value, b, nb, cap)
  local head = e.dh and math.max(e.dh, b) or b
  if b <= head - nb then return nil end
  local d = dkey(e.pk, e.ent)
  if e.dh and e.dh < head then redis.call('ZREMRANGEBYSCORE', d, '-inf', head - nb) end
  e.dh = head
  local prev = tonumber(redis.call('ZSCORE', d, value))
  redis.call('ZADD', d, prev and math.max(prev, b) or b, value)
  if redis.call('ZCARD', d) > cap then
    local oldest = redis.call('ZRANGE', d, 0, 1)
    for _, v in ipairs(oldest) do
      if v ~= value then redis.call('ZREM', d, v); break end
    end
  end
  return redis.call('ZCARD', d), prev
end

local function d_count_at(e, b, nb)
  local head = e.dh and math.max(e.dh, b) or b
  return redis.call('ZCOUNT', dkey(e.pk, e.ent), '(' .. fmt(head - nb), '+inf')
end

-- Sequences (state.rs's advance): every partial sequence is followed, as runs of
-- start sub-buckets per step.
local function seq_completed(runs, min)
  local seen = 0
  for i = #runs, 1, -1 do
    seen = seen + runs[i][2]
    if seen >= math.max(min, 1) then return runs[i][1] end
  end
  return nil
end
local function seq_add(runs, start, min)
  local i = 1
  while i <= #runs and runs[i][1] < start do i = i + 1 end
  if i <= #runs and runs[i][1] == start then
    runs[i][2] = runs[i][2] + 1
  else
    table.insert(runs, i, { start, 1 })
  end
  local total = 0
  for _, r in ipairs(runs) do total = total + r[2] end
  local excess = total - math.max(min, 1)
  while excess > 0 and #runs > 0 do
    if runs[1][2] <= excess then
      excess = excess - runs[1][2]
      table.remove(runs, 1)
    else
      runs[1][2] = runs[1][2] - excess
      excess = 0
    end
  end
end
-- state.rs's take_back: `added` as "step:start,..." (steps from 0).
local function seq_take_back(e, added)
  if not (e.seq and e.seq.steps) or type(added) ~= 'string' then return end
  local steps = e.seq.steps
  for st, b in string.gmatch(added, '([^,:]+):([^,]+)') do
    local runs = steps[tonumber(st) + 1]
    local bn = tonumber(b)
    if runs and bn then
      for i, r in ipairs(runs) do
        if r[1] == bn then
          r[2] = r[2] - 1
          if r[2] <= 0 then table.remove(runs, i) end
          break
        end
      end
    end
  end
  for _, runs in ipairs(steps) do
    if #runs > 0 then return end
  end
  e.seq = nil
end
-- state.rs's give_back.
local function seq_give_back(e, consumed)
  local steps = (e.seq and e.seq.steps) or {}
  for i = #steps + 1, #consumed do steps[i] = {} end
  for i, back in ipairs(consumed) do
    local runs = steps[i]
    for _, r in ipairs(back) do
      local j = 1
      while j <= #runs and runs[j][1] < r[1] do j = j + 1 end
      if j <= #runs and runs[j][1] == r[1] then
        runs[j][2] = runs[j][2] + r[2]
      else
        table.insert(runs, j, { r[1], r[2] })
      end
    end
  end
  e.seq = { steps = steps }
  for _, runs in ipairs(steps) do
    if #runs > 0 then return end
  end
  e.seq = nil
end
-- Returns whether the sequence completed, what the event added ("step:start,...", ''
-- for nothing) and, on completion, the steps it consumed (else nil).
local function advance(e, mins, mask, b, nb, bms)
  local n = #mins
  if n == 0 then return false, '', nil end
  local steps = {}
  if e.seq and e.seq.steps then
    steps = e.seq.steps
  elseif e.seq then
    local st = math.floor(e.seq.started / math.max(bms, 1))
    for i = 1, n do
      if i - 1 < e.seq.step then
        steps[i] = { { st, mins[i] } }
      elseif i - 1 == e.seq.step then
        steps[i] = { { st, math.min(e.seq.matched, mins[i]) } }
      end
    end
  end
  for i = 1, n do steps[i] = steps[i] or {} end
  for i = #steps, n + 1, -1 do steps[i] = nil end
  local head = b
  for i = 1, n do
    local r = steps[i]
    if #r > 0 and r[#r][1] > head then head = r[#r][1] end
  end
  local oldest = head - nb + 1
  for i = 1, n do
    local r = steps[i]
    while #r > 0 and r[1][1] < oldest do table.remove(r, 1) end
  end
  -- Later steps first: one event counts for one step of a partial sequence.
  local added = {}
  for i = n, 1, -1 do
    if bit.band(mask, bit.lshift(1, i - 1)) ~= 0 then
      local start
      if i == 1 then
        if b >= oldest then start = b end
      else
        start = seq_completed(steps[i - 1], mins[i - 1])
      end
      if start then
        seq_add(steps[i], start, mins[i])
        added[#added + 1] = fmt(i - 1) .. ':' .. fmt(start)
      end
    end
  end
  local added_text = table.concat(added, ',')
  local done = seq_completed(steps[n], mins[n]) ~= nil
  e.seq = { steps = steps }
  if done then
    seq_take_back(e, added_text)
    local consumed = (e.seq and e.seq.steps) or {}
    e.seq = nil
    return true, added_text, consumed
  end
  local empty = true
  for i = 1, n do
    if #steps[i] > 0 then empty = false end
  end
  if empty then e.seq = nil end
  return false, added_text, nil
end

-- Takes back everything receipt `rid` did (a failed publish, or a lease that ran out).
local function rollback(rid)
  local uk = P .. ':u:' .. rid
  local raw = redis.call('GET', uk)
  redis.call('DEL', uk)
  redis.call('ZREM', RC, rid)
  if not raw then return false end
  local u = cjson.decode(raw)
  for _, id in ipairs(u.ids) do
    if redis.call('HGET', FL, id) == rid then redis.call('HDEL', FL, id) end
  end
  for i = #u.inc, 1, -1 do
    local x = u.inc[i]
    local e = load(x[1], x[2], false)
    if e then
      if x[3] == 'w' then
        w_remove(e, tonumber(x[4]), tonumber(x[5]))
      elseif x[3] == 'd' then
        local d = dkey(e.pk, e.ent)
        if x[5] ~= '' then redis.call('ZADD', d, tonumber(x[5]), x[4])
        else redis.call('ZREM', d, x[4]) end
      elseif x[3] == 'q' then
        seq_take_back(e, x[4])
        if type(x[5]) == 'string' then seq_give_back(e, seq_decode(x[5])) end
      else
        -- An undo log of a version before 'q': the progress to restore.
        local s = x[4]
        if s and s ~= cjson.null and type(s) == 'table' then
          e.seq = { step = tonumber(s[1]), matched = tonumber(s[2]), started = tonumber(s[3]) }
        else
          e.seq = nil
        end
      end
    end
  end
  for i = #u.cd, 1, -1 do
    local x = u.cd[i]
    local e = load(x[1], x[2], false)
    if e and tostring(e.cb) == rid then
      e.cu, e.cb, e.lv, e.of, e.lo = tonumber(x[3]), tonumber(x[4]), tonumber(x[5]), tonumber(x[6]), tonumber(x[7])
      -- Logs written by versions without the prior offense end at x[7].
      e.po = tonumber(x[8]) or 0
    end
  end
  return true
end

-- Receipts whose lease ran out belong to a worker that died or stalled: undo them
-- before anything reads the state.
local function sweep()
  local expired = redis.call('ZRANGEBYSCORE', RC, '-inf', now, 'LIMIT', 0, 100)
  -- Newest first, as a batch's own changes are undone (postgres.rs does the same).
  table.sort(expired, function(a, b) return tonumber(a) > tonumber(b) end)
  for _, rid in ipairs(expired) do rollback(rid) end
  return #expired
end

local function total_entities()
  local n = 0
  for _, pk in ipairs(redis.call('SMEMBERS', POLS)) do n = n + redis.call('ZCARD', P .. ':ix:' .. pk) end
  return n
end

local function drop_entity(pk, ent)
  redis.call('DEL', ekey(pk, ent), dkey(pk, ent))
  redis.call('ZREM', P .. ':ix:' .. pk, ent)
end

local function stats()
  return { ents = total_entities(), ids = redis.call('ZCARD', IDS) + redis.call('HLEN', FL),
           ev = tonumber(redis.call('HGET', ST, 'ev')) or 0,
           iev = tonumber(redis.call('HGET', ST, 'iev')) or 0 }
end

local op = A.op
local hist = tonumber(A.ttl)

if op == 'apply' then
  sweep()
  local rid = tostring(redis.call('INCR', SEQ))
  extend(SEQ, hist)
  local pol = A.policies
  local dup, busy, crossings = {}, {}, {}
  local late = 0
  local undo = { ids = {}, inc = {}, cd = {} }
  for ei, ev in ipairs(A.events) do
    dup[ei], busy[ei] = '0', '0'
    if #ev.h > 0 then
      local id = ev.id
      local mark = redis.call('HGET', FL, id)
      local skip = false
      if mark == rid then
        dup[ei] = '1'; skip = true
      elseif mark and redis.call('ZSCORE', RC, mark) then
        dup[ei] = '1'; busy[ei] = '1'; skip = true
      else
        local done = tonumber(redis.call('ZSCORE', IDS, id))
        if done and done > now then dup[ei] = '1'; skip = true end
      end
      if not skip then
        redis.call('HSET', FL, id, rid)
        undo.ids[#undo.ids + 1] = id
        for hi, h in ipairs(ev.h) do
          local p = pol[h[1] + 1]
          local ent, at, b, weight, dv, steps = h[2], tonumber(h[3]), tonumber(h[4]), tonumber(h[5]), h[6], tonumber(h[7])
          local counts = weight > 0 or dv ~= '' or steps ~= 0
          local e = load(p.k, ent, counts, p)
          if e then
            e.win = p.win
            local nb = p.nb
            local measured -- nil: nothing to check
            local is_late = false
            if #p.seq > 0 then
              local done, added, consumed = advance(e, p.seq, steps, b, nb, p.win / nb)
              if added ~= '' or consumed then
                undo.inc[#undo.inc + 1] = { p.k, ent, 'q', added, consumed and seq_encode(consumed) or false }
              end
              if done then
                local c = w_add(e, b, 1.0, nb)
                if c then
                  undo.inc[#undo.inc + 1] = { p.k, ent, 'w', fmt(b), fmt(1.0) }
                  measured = c
                else
                  is_late = true
                end
              end
            elseif p.dist then
              if dv ~= '' then
                local c, prev = d_add(e, dv, b, nb, A.cap_distinct)
                if c then
                  undo.inc[#undo.inc + 1] = { p.k, ent, 'd', dv, prev and fmt(prev) or '' }
                  measured = c
                else
                  is_late = true
                end
              else
                measured = d_count_at(e, b, nb)
              end
            elseif weight > 0 then
              local c = w_add(e, b, weight, nb)
              if c then
                undo.inc[#undo.inc + 1] = { p.k, ent, 'w', fmt(b), fmt(weight) }
                measured = c
              else
                is_late = true
              end
            else
              measured = w_count_at(e, b, nb)
            end
            if is_late then late = late + 1 end
            if counts then e.lt = now end
            if measured then
              measured = measured * p.sc
              local level, offense
              local function level_for(m, off)
                for i = #p.lad, 1, -1 do
                  local r = p.lad[i]
                  if off >= r[1] and (r[2] <= 0 or reached(m, r[2])) then return i end
                end
                return 0
              end
              -- memory.rs's Rules::ttl_ms: how long a decision at a level stands.
              local function ttl_for(lvl, off)
                local base = lvl > 0 and p.lad[lvl] and p.lad[lvl][3] or p.cd
                if p.gr <= 1 then return base end
                local grown = base * powi(p.gr, math.max(off - 1, 0))
                local cap = math.max(p.tm, base)
                if grown == grown and grown < cap then return math.floor(grown) end
                return cap
              end
              if e.cu <= now then
                if reached(measured, p.th) then
                  -- A repeat within the state TTL of the last decision's end.
                  local repeat_ = e.of > 0 and now - e.lo <= ttl_for(e.lv, e.of) + hist
                  offense = repeat_ and e.of + 1 or 1
                  level = level_for(measured, offense)
                end
              elseif #p.lad > 0 then
                local l = level_for(measured, e.of)
                if l > e.lv then level, offense = l, e.of end
              end
              if level then
                local ttl = ttl_for(level, offense)
                undo.cd[#undo.cd + 1] = { p.k, ent, fmt(e.cu), fmt(e.cb), fmt(e.lv), fmt(e.of), fmt(e.lo), fmt(e.po) }
                -- An escalation under a standing decision is the same offense.
                if e.cu <= now then e.po = e.lo end
                e.cu, e.cb, e.lv, e.of, e.lo = now + ttl, tonumber(rid), level, offense, now
                crossings[#crossings + 1] = table.concat({ ei - 1, hi - 1, fmt(measured), level, offense, fmt(ttl) }, ',')
              end
            end
          end
        end
      end
    end
  end
  save_all(hist)
  -- Over capacity: drop the entities idle soonest (those without a standing decision
  -- and least recently touched), down to 1% below, as the memory backend does.
  local total = total_entities()
  if total > A.cap then
    local excess = total - (A.cap - math.floor(A.cap / 100))
    local removed = 0
    while removed < excess do
      local best, best_pk, best_ent = nil, nil, nil
      for _, pk in ipairs(redis.call('SMEMBERS', POLS)) do
        local first = redis.call('ZRANGE', P .. ':ix:' .. pk, 0, 0, 'WITHSCORES')
        if #first == 2 and (not best or tonumber(first[2]) < best) then
          best, best_pk, best_ent = tonumber(first[2]), pk, first[1]
        end
      end
      if not best then break end
      drop_entity(best_pk, best_ent)
      removed = removed + 1
    end
    redis.call('HINCRBY', ST, 'ev', removed)
    extend(ST, hist)
  end
  local out_rid = '0'
  if #undo.ids > 0 then
    out_rid = rid
    redis.call('SET', P .. ':u:' .. rid, cjson.encode(undo), 'PX', math.floor(A.lease + hist))
    redis.call('ZADD', RC, now + A.lease, rid)
    extend(RC, A.lease + hist)
    extend(FL, A.lease + hist)
  end
  return cjson.encode({ rid = out_rid, dup = table.concat(dup), busy = table.concat(busy), late = late,
                        x = table.concat(crossings, ';'), st = stats() })
elseif op == 'commit' then
  -- What a sweep undoes lives in the script's cache until saved.
  if sweep() > 0 then save_all(hist) end
  local rid = A.rid
  -- Receipt 0 marked nothing in flight: only its records are committed.
  if rid ~= '0' and not redis.call('ZSCORE', RC, rid) then
    return cjson.encode({ expired = true, st = stats() })
  end
  local raw = redis.call('GET', P .. ':u:' .. rid)
  if raw then
    local u = cjson.decode(raw)
    local expiry = now + hist
    for _, id in ipairs(u.ids) do
      if redis.call('HGET', FL, id) == rid then
        redis.call('HDEL', FL, id)
        redis.call('ZADD', IDS, expiry, id)
      end
    end
  end
  redis.call('DEL', P .. ':u:' .. rid)
  redis.call('ZREM', RC, rid)
  local n = redis.call('ZCARD', IDS)
  if n > A.cap then
    redis.call('ZPOPMIN', IDS, n - A.cap)
    redis.call('HINCRBY', ST, 'iev', n - A.cap)
    extend(ST, hist)
  end
  extend(IDS, hist)
  local dropped, pending = 0, 0
  if A.log and #A.log > 0 then
    dropped, pending = outbox_append(LOG, LOGSEQ, A.log, A.logcap)
  end
  return cjson.encode({ expired = false, dropped = dropped, pending = pending, st = stats() })
elseif op == 'rollback' then
  rollback(A.rid)
  save_all(hist)
  return cjson.encode({ st = stats() })
elseif op == 'forgive' then
  -- The memory backend's EntityState::forgive: the standing decision, when it is the
  -- revoked one (made at the same instant), ends, with its window and its offense.
  local n = 0
  for _, r in ipairs(A.rev) do
    local e = load(r[1], r[2], false)
    if e and e.cu > now and e.lo == r[3] then
      e.cu, e.lv, e.of = now, 0, math.max(e.of - 1, 0)
      -- As the memory backend: the history runs from the offense before, when known.
      if e.of > 0 and e.po ~= 0 then e.lo = e.po end
      e.po = 0
      e.w, e.seq, e.dh = {}, nil, nil
      redis.call('DEL', dkey(e.pk, e.ent))
      n = n + 1
    end
  end
  save_all(hist)
  return cjson.encode({ forgiven = n, st = stats() })
elseif op == 'retain' then
  local keep = {}
  for _, pk in ipairs(A.keep) do keep[pk] = true end
  for _, pk in ipairs(redis.call('SMEMBERS', POLS)) do
    if not keep[pk] then
      local ix = P .. ':ix:' .. pk
      for _, ent in ipairs(redis.call('ZRANGE', ix, 0, -1)) do
        redis.call('DEL', ekey(pk, ent), dkey(pk, ent))
      end
      redis.call('DEL', ix)
      redis.call('SREM', POLS, pk)
    end
  end
  return cjson.encode({ st = stats() })
elseif op == 'cleanup' then
  local swept = sweep()
  save_all(hist)
  local ents = 0
  for _, pk in ipairs(redis.call('SMEMBERS', POLS)) do
    local ix = P .. ':ix:' .. pk
    for _, ent in ipairs(redis.call('ZRANGEBYSCORE', ix, '-inf', now)) do
      redis.call('DEL', ekey(pk, ent), dkey(pk, ent))
      ents = ents + 1
    end
    redis.call('ZREMRANGEBYSCORE', ix, '-inf', now)
    if redis.call('ZCARD', ix) == 0 then redis.call('SREM', POLS, pk) end
  end
  local ids = redis.call('ZREMRANGEBYSCORE', IDS, '-inf', now)
  return cjson.encode({ ents = ents, ids = ids, swept = swept, st = stats() })
elseif op == 'stats' then
  return cjson.encode({ st = stats() })
elseif op == 'log_claim' then
  return outbox_claim(LOG, LOGLEASE, A.owner, A.lease, A.limit)
elseif op == 'log_ack' then
  return outbox_ack(LOG, LOGLEASE, A.owner, A.nums or {}, A.lease)
elseif op == 'log_release' then
  return outbox_release(LOGLEASE, A.owner)
end
return redis.error_reply('unknown state operation')
