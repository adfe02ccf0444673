"""The fleet's Redis keys and the Lua scripts that change them, each one atomic step.

Every key shares the hash tag ``{aether}``, so every script and the gateway's MULTI also run on
managed services that want one slot per script or transaction. Only Redis 7.0 is assumed (no
``HEXPIRE``, no keyspace notifications): liveness is a sorted set of deadlines, not expiring keys.

=========  ===========  ==================================================================
key        type         holds
=========  ===========  ==================================================================
state      hash         prefix -> the workspace blob (:mod:`aether.fleet.blob`)
epoch      hash         prefix -> the epoch that owns it (read by every update and
                        heartbeat without decoding the blob)
alive      sorted set   prefix -> deadline: Redis time in ms of the last heartbeat +
                        dead_after; a clean stop sets it to the stop's time
changes    stream       one entry per change: ``seq``, ``prefix``, ``state`` (the blob after
                        the change, ``""`` when the workspace was removed)
seq        string       the last change's sequence number
boot       string       a random id, set when missing: it changes when Redis lost its data
=========  ===========  ==================================================================

Times are Redis's own (``TIME``), never a VM's or a gateway's clock.
"""

from __future__ import annotations

NAMESPACE = "aether:{aether}:"
STATE = NAMESPACE + "state"
EPOCH = NAMESPACE + "epoch"
ALIVE = NAMESPACE + "alive"
CHANGES = NAMESPACE + "changes"
SEQ = NAMESPACE + "seq"
BOOT = NAMESPACE + "boot"

#: Stream entries kept (approximately: MAXLEN ~ trims whole nodes). At 1,000 changes/s that is
#: 100 s of history for a gateway that fell behind; one further back reloads (a gap).
STREAM_MAXLEN = 100_000

_NOW = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
"""

#: Whether this caller's epoch owns the prefix: nil when it does, else 'missing' (Redis has no
#: record of it: restarted empty, or reaped) or 'superseded' (a newer start took it over).
_OWNED = """
local function owned(prefix, epoch)
  local stored = redis.call('HGET', KEYS[1], prefix)
  if not stored then return 'missing' end
  if stored ~= epoch then return 'superseded' end
  return nil
end
"""

_CHANGE = """
local function change(prefix, state)
  local seq = redis.call('INCR', KEYS[4])
  redis.call('XADD', KEYS[3], 'MAXLEN', '~', ARGV[#ARGV], '*', 'seq', seq, 'prefix', prefix, 'state', state)
  return seq
end
"""

#: The keys every changing script takes, in this order.
CHANGE_KEYS = (EPOCH, STATE, CHANGES, SEQ, ALIVE, BOOT)

#: claim(prefix, project, epoch, blob, dead_after_ms, boot_candidate, maxlen) at a VM's start,
#: and whenever it finds its state missing or reconnects. Refused ('taken', workspace) when the
#: prefix belongs to another project whose deadline is still ahead; else the blob replaces any
#: earlier one (a new epoch of the same project supersedes the old), with a fresh deadline.
CLAIM = (
    _NOW
    + _CHANGE
    + """
local prefix = ARGV[1]
local old = redis.call('HGET', KEYS[2], prefix)
if old then
  local ok, stored = pcall(cjson.decode, old)
  if ok and type(stored) == 'table' and stored['project'] ~= ARGV[2] then
    local deadline = redis.call('ZSCORE', KEYS[5], prefix)
    if deadline and tonumber(deadline) > now then
      local workspace = stored['workspace']
      return {'taken', type(workspace) == 'string' and workspace or '?'}
    end
  end
end
redis.call('HSET', KEYS[1], prefix, ARGV[3])
redis.call('HSET', KEYS[2], prefix, ARGV[4])
redis.call('ZADD', KEYS[5], string.format('%d', now + tonumber(ARGV[5])), prefix)
redis.call('SET', KEYS[6], ARGV[6], 'NX')
return {'ok', change(prefix, ARGV[4])}
"""
)

#: update(prefix, epoch, blob, maxlen): one change of a workspace this epoch owns.
UPDATE = (
    _OWNED
    + _CHANGE
    + """
local refused = owned(ARGV[1], ARGV[2])
if refused then return {refused} end
redis.call('HSET', KEYS[2], ARGV[1], ARGV[3])
return {'ok', change(ARGV[1], ARGV[3])}
"""
)

#: heartbeat(prefix, epoch, dead_after_ms, maxlen): a new deadline. No stream entry, except
#: when the old deadline had passed: every gateway holds the workspace dead, and the entry (its
#: blob, unchanged) tells them at once that it is back.
HEARTBEAT = (
    _NOW
    + _OWNED
    + _CHANGE
    + """
local refused = owned(ARGV[1], ARGV[2])
if refused then return {refused} end
local deadline = redis.call('ZSCORE', KEYS[5], ARGV[1])
redis.call('ZADD', KEYS[5], string.format('%d', now + tonumber(ARGV[3])), ARGV[1])
if not deadline or tonumber(deadline) <= now then
  local state = redis.call('HGET', KEYS[2], ARGV[1])
  if state then return {'ok', now, change(ARGV[1], state)} end
end
return {'ok', now}
"""
)

#: stop(prefix, epoch, blob with alive false, maxlen) at a clean exit: gateways answer 503 at
#: once, and the prefix is free for another project (its deadline is now).
STOP = (
    _NOW
    + _OWNED
    + _CHANGE
    + """
local refused = owned(ARGV[1], ARGV[2])
if refused then return {refused} end
redis.call('HSET', KEYS[2], ARGV[1], ARGV[3])
redis.call('ZADD', KEYS[5], string.format('%d', now), ARGV[1])
return {'ok', change(ARGV[1], ARGV[3])}
"""
)

#: reap(retain_ms, limit, maxlen): forget up to ``limit`` workspaces whose deadline passed more
#: than ``retain_ms`` ago (a VM deleted for good); each is one removal entry. Any gateway may run
#: it; two running it at once remove each workspace once.
REAP = (
    _NOW
    + _CHANGE
    + """
local gone = redis.call('ZRANGEBYSCORE', KEYS[5], '-inf', string.format('%d', now - tonumber(ARGV[1])),
                        'LIMIT', 0, tonumber(ARGV[2]))
for _, prefix in ipairs(gone) do
  redis.call('HDEL', KEYS[1], prefix)
  redis.call('HDEL', KEYS[2], prefix)
  redis.call('ZREM', KEYS[5], prefix)
  change(prefix, '')
end
return #gone
"""
)

#: liveness(prev_ms or '', dead prefix...) -> {now, boot, [prefix, deadline, ...] of deadlines
#: in (prev, now] (all up to now without prev), deadlines of the given prefixes}: one round trip
#: per check, with Redis's clock.
LIVENESS_KEYS = (ALIVE, BOOT)
LIVENESS = (
    _NOW
    + """
local low = '-inf'
if ARGV[1] ~= '' then low = '(' .. ARGV[1] end
local expired = redis.call('ZRANGEBYSCORE', KEYS[1], low, string.format('%d', now), 'WITHSCORES')
local scores = {}
if #ARGV > 1 then scores = redis.call('ZMSCORE', KEYS[1], unpack(ARGV, 2)) end
return {now, redis.call('GET', KEYS[2]), expired, scores}
"""
)
