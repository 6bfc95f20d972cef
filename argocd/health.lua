-- Argo CD health check for llmoperator.io/LLMDeployment (resource.customizations.health).
-- Maps the operator's status to Healthy, Progressing, Degraded or Suspended.
-- Source of truth: argocd/health.lua; docs/argocd.md embeds it (a test keeps them equal).
local hs = {}

local function condition(status, type)
  if status.conditions == nil then
    return nil
  end
  for _, c in ipairs(status.conditions) do
    if c.type == type then
      return c
    end
  end
  return nil
end

local function text(c, fallback)
  if c ~= nil and c.message ~= nil and c.message ~= "" then
    return c.message
  end
  if c ~= nil and c.reason ~= nil and c.reason ~= "" then
    return c.reason
  end
  return fallback
end

local function is_paused(c)
  return c ~= nil and c.reason == "Paused"
end

local status = obj.status
if status == nil then
  hs.status = "Progressing"
  hs.message = "Waiting for the operator to report status"
  return hs
end

-- Status that describes an older spec says nothing about this one.
local generation = obj.metadata.generation
if generation ~= nil and (status.observedGeneration == nil or status.observedGeneration < generation) then
  hs.status = "Progressing"
  hs.message = "Waiting for the operator to observe generation " .. tostring(generation)
  return hs
end

local ready = condition(status, "Ready")
local degraded = condition(status, "Degraded")
local canary = condition(status, "CanaryProgressing")

-- A spec that cannot work, or a serving model that lost its replicas or failed its canary.
if status.phase == "Failed" then
  hs.status = "Degraded"
  hs.message = text(degraded, text(ready, "The LLMDeployment failed"))
  return hs
end
if (degraded ~= nil and degraded.status == "True") or status.phase == "Degraded" then
  hs.status = "Degraded"
  hs.message = text(degraded, text(ready, "The LLMDeployment is degraded"))
  return hs
end

-- Paused on purpose: a paused canary (condition CanaryProgressing with reason Paused), or no
-- replicas asked for (replicas: 0, or scaled to zero by KEDA). Nothing is wrong, and nothing
-- changes until someone acts or traffic comes.
if is_paused(canary) then
  hs.status = "Suspended"
  hs.message = text(canary, "The canary is paused")
  return hs
end
local spec = obj.spec or {}
if spec.replicas == 0 then
  hs.status = "Suspended"
  hs.message = "Scaled to 0 replicas"
  return hs
end
if spec.autoscaling ~= nil and spec.autoscaling.minReplicas == 0 and status.replicas == 0 then
  hs.status = "Suspended"
  hs.message = "Scaled to zero; the first request scales it up"
  return hs
end

if canary ~= nil and canary.status == "True" then
  hs.status = "Progressing"
  hs.message = "Canary in progress"
  if status.canary ~= nil and status.canary.weight ~= nil then
    hs.message = "Canary at " .. tostring(status.canary.weight) .. "% of traffic"
  end
  if canary.message ~= nil and canary.message ~= "" then
    hs.message = canary.message
  end
  return hs
end

if (ready ~= nil and ready.status == "True") or (ready == nil and status.phase == "Ready") then
  hs.status = "Healthy"
  hs.message = text(ready, "Ready")
  return hs
end

hs.status = "Progressing"
local progressing = condition(status, "Progressing")
local fallback = "Waiting for the model to become ready"
if status.readyReplicas ~= nil and status.replicas ~= nil then
  fallback = tostring(status.readyReplicas) .. " of " .. tostring(status.replicas) .. " replicas ready"
end
hs.message = text(progressing, text(ready, fallback))
return hs
