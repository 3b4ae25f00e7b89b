-- Argo CD health check for pcn's custom resources: NetworkFunction,
-- CubeChain and NodePortRule (group pcn.dev). Argo CD runs it (gopher-lua,
-- Lua 5.1) with `obj` bound to the live object; see argocd-cm-patch.yaml.
--
-- Every pcn agent merges its node's verdict into status: conditions[Ready]
-- (True once realised on every node, else False with a reason and the first
-- failing node's message), observedGeneration, realizedNodes, realizedPods.
--   Progressing  no status yet, no Ready condition, Ready Unknown, or the
--                agents have not yet seen the latest spec (observedGeneration
--                behind metadata.generation)
--   Healthy      Ready True for the current generation
--   Degraded     Ready False for the current generation: "<reason>: <message>"
local hs = {}

local status = obj.status
if status == nil or status.conditions == nil then
  hs.status = "Progressing"
  hs.message = "Waiting for the pcn agents to report"
  return hs
end

local ready = nil
for _, c in ipairs(status.conditions) do
  if c.type == "Ready" then
    ready = c
  end
end
if ready == nil then
  hs.status = "Progressing"
  hs.message = "Waiting for the Ready condition"
  return hs
end

local generation = nil
if obj.metadata ~= nil then
  generation = obj.metadata.generation
end
local observed = ready.observedGeneration
if observed == nil then
  observed = status.observedGeneration
end
if generation ~= nil and observed ~= nil and observed ~= generation then
  hs.status = "Progressing"
  hs.message = "Waiting for the pcn agents to realise generation " .. tostring(generation)
    .. " (last seen: " .. tostring(observed) .. ")"
  return hs
end

local message = ready.message
if message == nil or message == "" then
  message = ready.reason
end
if ready.status == "True" then
  hs.status = "Healthy"
  hs.message = message or "Ready"
elseif ready.status == "False" then
  hs.status = "Degraded"
  local reason = ready.reason or "NotReady"
  if ready.message ~= nil and ready.message ~= "" then
    hs.message = reason .. ": " .. ready.message
  else
    hs.message = reason
  end
else
  hs.status = "Progressing"
  hs.message = message or "Ready is Unknown"
end
return hs
