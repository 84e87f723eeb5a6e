// The fleet's Redis scripts. Each runs atomically in Redis, reads the time from Redis itself (one clock for the
// whole fleet, whatever the hosts' clocks say) and touches only the keys it is given.
//
// Keys (prefix `sockpool:{NAME}:`, NAME = fleet.name; the braces keep one fleet in one Redis Cluster slot):
//   members           ZSET  daemon id -> ms (Redis time) until which its heartbeat holds it alive
//   slots:ORIGIN      HASH  daemon id -> connection slots it holds for ORIGIN
//   waiters:ORIGIN    ZSET  daemon id -> ms (Redis time) since which it waits for a slot of ORIGIN (the queue's order)
//   asked:ORIGIN      HASH  daemon id -> ms (Redis time) it last asked for one (a waiter silent for long is dropped)
//   rate:ORIGIN       STRING  GCRA theoretical arrival time of the next request, ms (Redis time)
//   demand:DAEMON     HASH  origin key -> requests per second that daemon saw (published every demandPublishMs)
// Channel `sockpool:{NAME}:freed`: the slots hash of an origin whose slots were given back (a release, a daemon
// leaving), so that connects waiting for one of them ask again at once (fleet.ts).
// Channel `sockpool:{NAME}:contended`: "DAEMON SLOTS-HASH" when that daemon starts to wait for a slot of the origin
// that others hold, so that they ask their clients for connections idle in their caches at once (fleet.ts
// onContended) rather than at their next heartbeat (HEARTBEAT_SCRIPT tells them again while it waits).

/** Redis time in ms (float). Scripts that call TIME replicate their effects, not the script (Redis >= 5 default). */
const NOW = `local t = redis.call('TIME'); local now = tonumber(t[1]) * 1000 + tonumber(t[2]) / 1000`;

/**
 * Sets a shared key's expiry to `ms` unless it already lasts longer. The keys every member writes (members, slots,
 * waiters, asked) expire only to clean up after a fleet that is gone, and members may run with different
 * `slotTtlMs`: one with a short one must not cut short the key another member's live slots are counted in.
 */
const EXTEND = `local function extend(key, ms) if redis.call('PTTL', key) < tonumber(ms) then redis.call('PEXPIRE', key, ms) end end`;

/**
 * Takes `n` slots of ORIGIN for a daemon if the fleet stays within `cap` and no daemon that waits for one is ahead
 * of it. Slots of daemons whose heartbeat expired are dropped first. Fair across daemons: a daemon refused while
 * `wait` is 1 joins the origin's queue of waiters (at its end, unless it is in it); a free slot goes to the waiters
 * in the queue's order, so a daemon that asks more often, or is nearer Redis, or only takes free slots (refills,
 * prewarms: `wait` 0), cannot take the slot another daemon waits for; a daemon granted a slot leaves the queue and
 * joins its end again if it still waits (round robin). A waiter that has not asked for `waiter ttl` ms is dropped
 * (a waiting connect asks at least every SLOT_WAIT_HEARD_MS, fleet.ts). KEYS: slots hash, members zset, waiters
 * zset, asked hash. ARGV: daemon id, cap, n, hash ttl ms, membership ttl ms (a daemon taking a slot is alive: it
 * joins if Redis lost its membership), wait (1 or 0), waiter ttl ms, the `contended` channel (a daemon that joins
 * the queue while others hold slots says so there). Returns {1, held by all after} or {0, held by all}.
 */
export const TAKE_SLOTS_SCRIPT = `
${NOW}
${EXTEND}
if not redis.call('ZSCORE', KEYS[2], ARGV[1]) then redis.call('ZADD', KEYS[2], now + tonumber(ARGV[5]), ARGV[1]) end
local fields = redis.call('HGETALL', KEYS[1])
local total = 0
for i = 1, #fields, 2 do
  local alive = redis.call('ZSCORE', KEYS[2], fields[i])
  if (not alive) or tonumber(alive) < now then
    redis.call('HDEL', KEYS[1], fields[i])
  else
    total = total + tonumber(fields[i + 1])
  end
end
local n = tonumber(ARGV[3])
local waiter_ttl = tonumber(ARGV[7])
local ahead = 0
local queued = false
for _, waiter in ipairs(redis.call('ZRANGE', KEYS[3], 0, -1)) do
  if waiter == ARGV[1] then
    queued = true
    break
  end
  local asked = tonumber(redis.call('HGET', KEYS[4], waiter) or '0')
  if asked + waiter_ttl < now then
    redis.call('ZREM', KEYS[3], waiter)
    redis.call('HDEL', KEYS[4], waiter)
  else
    ahead = ahead + 1
  end
end
if total + ahead + n <= tonumber(ARGV[2]) then
  redis.call('HINCRBY', KEYS[1], ARGV[1], n)
  extend(KEYS[1], ARGV[4])
  if queued then
    redis.call('ZREM', KEYS[3], ARGV[1])
    redis.call('HDEL', KEYS[4], ARGV[1])
  end
  return {1, total + n}
end
if ARGV[6] == '1' then
  local joined = redis.call('ZADD', KEYS[3], 'NX', now, ARGV[1])
  if joined == 1 and total > tonumber(redis.call('HGET', KEYS[1], ARGV[1]) or '0') then
    redis.call('PUBLISH', ARGV[8], ARGV[1] .. ' ' .. KEYS[1])
  end
  redis.call('HSET', KEYS[4], ARGV[1], now)
  extend(KEYS[3], waiter_ttl * 10)
  extend(KEYS[4], waiter_ttl * 10)
end
return {0, total}
`;

/**
 * A daemon no longer waits for a slot of ORIGIN (its waiting connects gave up): it leaves the queue, so that the
 * daemons behind it need not wait for its entry to go stale. KEYS: waiters zset, asked hash. ARGV: daemon id.
 */
export const UNWAIT_SCRIPT = `
redis.call('ZREM', KEYS[1], ARGV[1])
redis.call('HDEL', KEYS[2], ARGV[1])
return 1
`;

/**
 * Gives back `n` slots of ORIGIN and says so on the `freed` channel. KEYS: slots hash. ARGV: daemon id, n, channel.
 * Returns what the daemon holds after.
 */
export const RELEASE_SLOTS_SCRIPT = `
local left = redis.call('HINCRBY', KEYS[1], ARGV[1], -tonumber(ARGV[2]))
redis.call('PUBLISH', ARGV[3], KEYS[1])
if left <= 0 then redis.call('HDEL', KEYS[1], ARGV[1]); return 0 end
return left
`;

/**
 * The heartbeat: renews the daemon's membership and states what it holds (absolute counts, so a lost release or a
 * Redis that restarted empty is corrected within one heartbeat), and says which of the origins it holds slots of
 * another daemon waits for (asked within `waiter ttl`): idle connections of this daemon's clients should give theirs
 * back (fleet.ts, onContended). KEYS: members zset, then one slots hash per origin, then one asked hash per origin
 * (same order). ARGV: daemon id, membership ttl ms, hash ttl ms, waiter ttl ms, then one count per origin. Returns
 * {live members, {1-based indexes of the contended origins}}.
 */
export const HEARTBEAT_SCRIPT = `
${NOW}
${EXTEND}
redis.call('ZADD', KEYS[1], now + tonumber(ARGV[2]), ARGV[1])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
extend(KEYS[1], ARGV[2] * 10)
local n = (#KEYS - 1) / 2
local waiter_ttl = tonumber(ARGV[4])
local contended = {}
for i = 1, n do
  local held = tonumber(ARGV[i + 4])
  local slots = KEYS[i + 1]
  if held > 0 then
    redis.call('HSET', slots, ARGV[1], held)
    extend(slots, ARGV[3])
    local asked = redis.call('HGETALL', KEYS[n + i + 1])
    for j = 1, #asked, 2 do
      if asked[j] ~= ARGV[1] and tonumber(asked[j + 1]) + waiter_ttl >= now then
        contended[#contended + 1] = i
        break
      end
    end
  else
    redis.call('HDEL', slots, ARGV[1])
  end
end
return {redis.call('ZCARD', KEYS[1]), contended}
`;

/**
 * GCRA (gcra.ts has the same arithmetic): up to `wanted` tokens of ORIGIN. KEYS: rate key. ARGV: emission interval
 * ms, burst, wanted, and how long (ms from now) this daemon last saw the TAT ahead of Redis's clock (0: not ahead).
 * The key lives 1 s past its TAT, so a key missing while a member saw its TAT ahead was lost (a Redis restarted
 * empty, an eviction): the TAT starts at what the member saw, never past a spent burst (a member's clock is not
 * Redis's), and a lost key grants no fresh burst on top of the one just spent. Returns {granted, wait ms, ms from
 * now to the TAT after} as strings (Lua numbers come back truncated to integers).
 */
export const RATE_SCRIPT = `
${NOW}
local interval = tonumber(ARGV[1])
local burst = tonumber(ARGV[2])
local wanted = tonumber(ARGV[3])
local seen = now + math.min(tonumber(ARGV[4]), burst * interval)
local tat = math.max(tonumber(redis.call('GET', KEYS[1]) or now), seen)
local start = math.max(tat, now)
local room = math.floor((now + burst * interval - start) / interval + 1e-9)
local granted = math.max(0, math.min(wanted, room))
if granted > 0 then
  local new_tat = start + granted * interval
  redis.call('SET', KEYS[1], string.format('%.3f', new_tat), 'PX', math.ceil(new_tat - now + 1000))
  return {granted, '0', string.format('%.3f', new_tat - now)}
end
return {0, string.format('%.3f', math.max(0, start + interval - (now + burst * interval))), string.format('%.3f', start - now)}
`;

/**
 * After a reconnect (Redis may have restarted empty): states again the TATs this daemon saw ahead of Redis's clock,
 * each raising its key only (what another member stated or took since stays). KEYS: rate keys. ARGV: for each, ms
 * from now to the TAT seen (bounded by the caller to a spent burst).
 */
export const RATE_RESTATE_SCRIPT = `
${NOW}
for i = 1, #KEYS do
  local tat = now + tonumber(ARGV[i])
  if tat > tonumber(redis.call('GET', KEYS[i]) or '0') then
    redis.call('SET', KEYS[i], string.format('%.3f', tat), 'PX', math.ceil(tat - now + 1000))
  end
end
return #KEYS
`;

/**
 * Removes a daemon from the fleet at a clean stop. KEYS: members zset, then its slots hashes. ARGV: daemon id, the
 * `freed` channel.
 */
export const LEAVE_SCRIPT = `
redis.call('ZREM', KEYS[1], ARGV[1])
for i = 2, #KEYS do
  if redis.call('HDEL', KEYS[i], ARGV[1]) > 0 then redis.call('PUBLISH', ARGV[2], KEYS[i]) end
end
return 1
`;
