-- Record which provider served each completion, for signature fetches.
--
-- KEYS[i]    <prefix>:chats:<id>   STRING: JSON {"url", "pubkey", "model"}
-- ARGV[1]    expiry in milliseconds, the same for every key
-- ARGV[i+1]  the JSON record for KEYS[i]
-- Returns    the number of keys written.
--
-- One script per batch instead of one SET per record: the gateway writes a record for
-- every chat completion, and a batch costs one command to encode and one reply to parse.
-- A later record for the same id replaces the earlier one.

local ttl_ms = ARGV[1]
for i, key in ipairs(KEYS) do
  redis.call('SET', key, ARGV[i + 1], 'PX', ttl_ms)
end
return #KEYS
