-- Remove endpoints of a provider key. When their owner removes them, also retire them
-- for the agent instances that sent them.
--
-- KEYS[1]  <prefix>:providers   HASH: pubkey -> entry JSON
-- KEYS[2]  <prefix>:expiry      ZSET: "<pubkey> <url>" scored by expires_at
-- ARGV[1]  pubkey (normalised)
-- ARGV[2]  url, or '' for every endpoint the caller may remove
-- ARGV[3]  '1' when the caller is the admin (may remove any endpoint), else '0'
-- ARGV[4]  caller identity (ignored for the admin)
-- ARGV[5]  prefix of the retired-instance keys, '<prefix>:retired:'
-- ARGV[6]  events channel
-- Returns  {'ok', url...} with the removed URLs, {'not_found'} when the key (or its
--          named url) has no endpoint, {'forbidden'} when the caller owns none of
--          the named endpoints. Only 'ok' writes.
--
-- '<prefix>:retired:<instance_id>' is a STRING, JSON {"<pubkey> <url>": retired_until}
-- (Unix seconds), expiring with its last mark. These keys are built here from the stored
-- entry, so this script is not Redis Cluster safe: it touches keys that KEYS does not name.

local pubkey, url = ARGV[1], ARGV[2]
local is_admin = ARGV[3] == '1'
local identity = ARGV[4]
local retired_prefix = ARGV[5]
local channel = ARGV[6]

local raw = redis.call('HGET', KEYS[1], pubkey)
if not raw then
  return {'not_found'}
end
local entry = cjson.decode(raw)

-- 1. Choose the endpoints to remove. Leases that already ended count as endpoints
-- until the reaper removes them.
local targets = {}
if url ~= '' then
  local endpoint = entry.endpoints[url]
  if not endpoint then
    return {'not_found'}
  end
  if not is_admin and endpoint.owner ~= identity then
    return {'forbidden'}
  end
  targets[1] = url
else
  for endpoint_url, endpoint in pairs(entry.endpoints) do
    if is_admin or endpoint.owner == identity then
      targets[#targets + 1] = endpoint_url
    end
  end
  table.sort(targets)
  if #targets == 0 then
    if next(entry.endpoints) == nil then
      return {'not_found'}
    end
    return {'forbidden'}
  end
end

local time = redis.call('TIME')
local now = (tonumber(time[1]) * 1000 + math.floor(tonumber(time[2]) / 1000)) / 1000

-- 2. Remove them. The owner's removal retires each endpoint for its sending instance
-- for one lease length, so that a heartbeat still in flight from that agent cannot
-- register the endpoint again.
local marks_by_instance = {}
for _, endpoint_url in ipairs(targets) do
  local endpoint = entry.endpoints[endpoint_url]
  local member = pubkey .. ' ' .. endpoint_url
  entry.endpoints[endpoint_url] = nil
  redis.call('ZREM', KEYS[2], member)
  if not is_admin and endpoint.instance_id ~= '' then
    local lease_s = (tonumber(endpoint.expires_at) or 0)
      - (tonumber(endpoint.last_heartbeat) or 0)
    local marks = marks_by_instance[endpoint.instance_id] or {}
    marks[member] = now + math.max(lease_s, 0.001)
    marks_by_instance[endpoint.instance_id] = marks
  end
end

-- Merge with the instance's earlier marks that are still in force; the key expires
-- with the last of them.
for instance_id, marks in pairs(marks_by_instance) do
  local key = retired_prefix .. instance_id
  local earlier = redis.call('GET', key)
  if earlier then
    local ok, decoded = pcall(cjson.decode, earlier)
    if ok and type(decoded) == 'table' then
      for retired_member, retired_until in pairs(decoded) do
        if marks[retired_member] == nil and (tonumber(retired_until) or 0) > now then
          marks[retired_member] = retired_until
        end
      end
    end
  end
  local last_until = now
  for _, retired_until in pairs(marks) do
    last_until = math.max(last_until, retired_until)
  end
  local ttl_ms = math.max(math.ceil((last_until - now) * 1000), 1)
  redis.call('SET', key, cjson.encode(marks), 'PX', ttl_ms)
end

-- cjson writes an empty table as [], so a key without endpoints is deleted, not stored.
if next(entry.endpoints) == nil then
  redis.call('HDEL', KEYS[1], pubkey)
else
  redis.call('HSET', KEYS[1], pubkey, cjson.encode(entry))
end

-- 3. Announce each removal.
local reply = {'ok'}
for _, endpoint_url in ipairs(targets) do
  redis.call('PUBLISH', channel, cjson.encode(
    {event = 'deregister', pubkey = pubkey, model = entry.model, url = endpoint_url}))
  reply[#reply + 1] = endpoint_url
end
return reply
