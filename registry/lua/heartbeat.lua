-- Register or renew one endpoint (pubkey, url) of a provider key, on the Redis clock.
--
-- KEYS[1]  <prefix>:providers   HASH: pubkey -> entry JSON
-- KEYS[2]  <prefix>:expiry      ZSET: "<pubkey> <url>" scored by expires_at
-- KEYS[3]  <prefix>:models      HASH: model -> Unix time a provider of it was last live
-- KEYS[4]  <prefix>:retired:<instance_id>  STRING: JSON {"<pubkey> <url>": retired_until},
--          read only when ARGV[7] is not empty
-- ARGV[1]  pubkey (normalised)
-- ARGV[2]  model
-- ARGV[3]  url
-- ARGV[4]  signing_algo
-- ARGV[5]  owner identity
-- ARGV[6]  ttl_s (seconds, may be fractional)
-- ARGV[7]  instance_id ('' when the agent sent none)
-- ARGV[8]  events channel
-- Returns  {outcome, expires_at, bound_model}, all strings. outcome is one of
--          register, refresh, owner_conflict, model_conflict, retired; expires_at is
--          '0' and bound_model '' unless they apply. A conflict writes nothing.

local pubkey, model, url, algo, owner = ARGV[1], ARGV[2], ARGV[3], ARGV[4], ARGV[5]
local ttl_s = tonumber(ARGV[6])
local instance_id = ARGV[7]
local channel = ARGV[8]

-- Times are kept to the millisecond: every stored time then fits the 14 significant
-- digits that cjson and Lua's number formatting write, so a JSON time and the ZSET
-- score of the same lease are the same number.
local function to_ms(seconds)
  return math.floor(seconds * 1000 + 0.5) / 1000
end

local function member(endpoint_url)
  return pubkey .. ' ' .. endpoint_url
end

local time = redis.call('TIME')
-- Truncated, so that no stored time is later than Redis TIME.
local now = (tonumber(time[1]) * 1000 + math.floor(tonumber(time[2]) / 1000)) / 1000

-- 1. An agent instance whose owner deregistered this endpoint must not bring it back.
-- Other endpoints of the same instance (a new key after a rotation) are not affected.
if instance_id ~= '' then
  local marks_raw = redis.call('GET', KEYS[4])
  if marks_raw then
    local ok, marks = pcall(cjson.decode, marks_raw)
    if ok and type(marks) == 'table' and (tonumber(marks[member(url)]) or 0) > now then
      return {'retired', '0', ''}
    end
  end
end

-- 2. Load the entry. A value that is not an entry (edited by hand) is overwritten.
local entry = nil
local raw = redis.call('HGET', KEYS[1], pubkey)
if raw then
  local ok, decoded = pcall(cjson.decode, raw)
  if ok and type(decoded) == 'table' and type(decoded.endpoints) == 'table' then
    entry = decoded
  end
end

-- 3. Drop ended leases first, so that an expired owner or model binding blocks nothing.
local expired = {}
local stored_model = ''
if entry then
  stored_model = entry.model
  for endpoint_url, endpoint in pairs(entry.endpoints) do
    if (tonumber(endpoint.expires_at) or 0) <= now then
      expired[#expired + 1] = endpoint_url
    end
  end
  for _, endpoint_url in ipairs(expired) do
    entry.endpoints[endpoint_url] = nil
  end
  if next(entry.endpoints) == nil then
    entry = nil
  end
end

-- 4. Conflicts with live endpoints.
local current = entry and entry.endpoints[url]
if current and current.owner ~= owner then
  return {'owner_conflict', '0', ''}
end
if entry and entry.model ~= model then
  return {'model_conflict', '0', tostring(entry.model)}
end

-- 5. Upsert the endpoint; registered_at survives a refresh of a live endpoint.
local outcome = 'register'
local registered_at = now
if current then
  outcome = 'refresh'
  registered_at = current.registered_at
end
if not entry then
  entry = {model = model, signing_algo = algo, endpoints = {}}
end
local expires_at = to_ms(now + ttl_s)
entry.endpoints[url] = {
  owner = owner,
  instance_id = instance_id,
  registered_at = registered_at,
  last_heartbeat = now,
  expires_at = expires_at,
}
redis.call('HSET', KEYS[1], pubkey, cjson.encode(entry))

-- 6. Keep the reaper's index and the models hash in step, then announce.
for _, endpoint_url in ipairs(expired) do
  redis.call('ZREM', KEYS[2], member(endpoint_url))
end
redis.call('ZADD', KEYS[2], expires_at, member(url))
redis.call('HSET', KEYS[3], model, now)
for _, endpoint_url in ipairs(expired) do
  redis.call('PUBLISH', channel, cjson.encode(
    {event = 'expire', pubkey = pubkey, model = stored_model, url = endpoint_url}))
end
redis.call('PUBLISH', channel, cjson.encode(
  {event = outcome, pubkey = pubkey, model = model, url = url}))

return {outcome, tostring(expires_at), ''}
