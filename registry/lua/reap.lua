-- Remove endpoints whose lease has ended, oldest first, on the Redis clock.
--
-- KEYS[1]  <prefix>:providers   HASH: pubkey -> entry JSON
-- KEYS[2]  <prefix>:expiry      ZSET: "<pubkey> <url>" scored by expires_at
-- ARGV[1]  events channel
-- ARGV[2]  maximum number of ZSET members to handle in this call
-- Returns  {removed, handled}: the endpoints removed and the ZSET members handled, as
--          integers. When handled equals ARGV[2], more may be left: call again.

local channel = ARGV[1]
local limit = tonumber(ARGV[2])

local time = redis.call('TIME')
local now = tonumber(time[1]) + tonumber(time[2]) / 1000000

local members = redis.call('ZRANGEBYSCORE', KEYS[2], '-inf', now, 'LIMIT', 0, limit)

-- 1. Remove each ended endpoint from its entry. Entries are decoded once and written
-- once, however many of their endpoints ended.
local entries = {}
local removed = 0
for _, item in ipairs(members) do
  local space = string.find(item, ' ', 1, true)
  local pubkey = space and string.sub(item, 1, space - 1) or item
  local url = space and string.sub(item, space + 1) or ''

  if entries[pubkey] == nil then
    local raw = redis.call('HGET', KEYS[1], pubkey)
    local ok, decoded = false, nil
    if raw then
      ok, decoded = pcall(cjson.decode, raw)
    end
    if ok and type(decoded) == 'table' and type(decoded.endpoints) == 'table' then
      entries[pubkey] = {entry = decoded, changed = false}
    else
      entries[pubkey] = false
    end
  end

  local slot = entries[pubkey]
  local endpoint = slot and slot.entry.endpoints[url]
  if endpoint and (tonumber(endpoint.expires_at) or 0) > now then
    -- The index is behind the entry: re-score it instead of removing a live endpoint.
    redis.call('ZADD', KEYS[2], endpoint.expires_at, item)
  else
    redis.call('ZREM', KEYS[2], item)
    if endpoint then
      slot.entry.endpoints[url] = nil
      slot.changed = true
      removed = removed + 1
      redis.call('PUBLISH', channel, cjson.encode(
        {event = 'expire', pubkey = pubkey, model = slot.entry.model, url = url}))
    end
  end
end

-- 2. Write back the changed entries; cjson writes an empty table as [], so an entry
-- without endpoints is deleted, not stored.
for pubkey, slot in pairs(entries) do
  if slot and slot.changed then
    if next(slot.entry.endpoints) == nil then
      redis.call('HDEL', KEYS[1], pubkey)
    else
      redis.call('HSET', KEYS[1], pubkey, cjson.encode(slot.entry))
    end
  end
end

return {removed, #members}
