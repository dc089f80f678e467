{{/*
Helpers of the kata-deploy job-mode chart. Names, labels, images, node selectors, the enabled
shims and the stage configuration are all computed here so every template agrees.
*/}}

{{/* The restricted (R) hypervisor annotations: they make the runtime use host programs or paths. */}}
{{- define "kata-deploy.restrictedAnnotations" -}}
entropy_source file_mem_backend jailer_path path vhost_user_store_path virtio_fs_daemon
{{- end -}}

{{/* This chart's own defaults (a byte-identical copy of values.yaml; hack/test-chart.sh checks it). */}}
{{- define "kata-deploy.defaults" -}}
{{- .Files.Get "files/values-defaults.yaml" -}}
{{- end -}}

{{/*
Fills every key of this chart's defaults that .Values lacks, in place (user keys always win,
also when false or empty). Needed because `helm upgrade --reuse-values` replaces the chart's
defaults with the previous release's values: over a release of upstream kata-deploy, or of an
older version of this chart, keys this chart added would otherwise be missing. Every template
calls it first; it is idempotent.
*/}}
{{- define "kata-deploy.init" -}}
{{- include "kata-deploy.dropNulls" .Values -}}
{{- include "kata-deploy.fill" (dict "dst" .Values "src" (include "kata-deploy.defaults" . | fromYaml)) -}}
{{- end -}}
{{- /* A key set to null (`--set affinity.nodeAffinity=null`, the usual way to clear an upstream
       default) means "not set", as Helm documents: the key is dropped (then filled from this
       chart's defaults where it has one), so no template meets a nil. */ -}}
{{- define "kata-deploy.dropNulls" -}}
{{- $m := . -}}
{{- range $k, $v := $m -}}
{{- if kindIs "invalid" $v -}}
{{- $_ := unset $m $k -}}
{{- else if kindIs "map" $v -}}
{{- include "kata-deploy.dropNulls" $v -}}
{{- end -}}
{{- end -}}
{{- end -}}
{{- /* A RuntimeClass's nodeSelector is the user's label data, not a key of ours: inside a
       runtimeClass that the values have, it is never filled, so clearing a default label
       (`--set shims.qemu-nvidia-gpu-snp.runtimeClass.nodeSelector=null`, or one key of it) leaves
       it cleared, as upstream's chart does. */ -}}
{{- define "kata-deploy.fill" -}}
{{- $dst := .dst -}}
{{- range $k, $d := .src -}}
{{- if and $.rc (eq $k "nodeSelector") -}}
{{- else if not (hasKey $dst $k) -}}
{{- if and (eq $k "runtimeClass") (kindIs "map" $d) -}}{{- $_ := set $dst $k (omit $d "nodeSelector") -}}
{{- else -}}{{- $_ := set $dst $k $d -}}{{- end -}}
{{- else if and (kindIs "map" $d) (kindIs "map" (index $dst $k)) -}}
{{- include "kata-deploy.fill" (dict "dst" (index $dst $k) "src" $d "rc" (eq $k "runtimeClass")) -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{/* Chart name. */}}
{{- define "kata-deploy.name" -}}
{{- .Chart.Name | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/*
Short base of every namespaced name and of the dispatcher name prefixes. The dispatcher accepts a
prefix of at most 30 characters starting with a letter, and appends "-install"/"-cleanup", so the
base is at most 22 characters; a longer release name is shortened with a stable hash so that two
releases in one namespace never share a prefix.
*/}}
{{- define "kata-deploy.base" -}}
{{- $n := .Release.Name | lower -}}
{{- if not (regexMatch "^[a-z]" $n) -}}{{- $n = printf "r%s" $n -}}{{- end -}}
{{- if gt (len $n) 22 -}}
{{- $n = printf "%s-%s" ($n | trunc 14 | trimSuffix "-") (sha256sum .Release.Name | trunc 7) -}}
{{- end -}}
{{- $n -}}
{{- end -}}

{{/* Cluster-scoped names must also be unique across namespaces. */}}
{{- define "kata-deploy.clusterBase" -}}
{{- printf "%s-%s" .Release.Namespace (include "kata-deploy.base" .) | trunc 50 | trimSuffix "-" -}}
{{- end -}}

{{- define "kata-deploy.installPrefix" -}}{{ include "kata-deploy.base" . }}-install{{- end -}}
{{- define "kata-deploy.cleanupPrefix" -}}{{ include "kata-deploy.base" . }}-cleanup{{- end -}}
{{/* The dispatcher Jobs: not of the form <prefix>-<node>, so they never collide with a per-node Job. */}}
{{- define "kata-deploy.installDispatcherName" -}}{{ include "kata-deploy.base" . }}-dispatch-install{{- end -}}
{{- define "kata-deploy.retireDispatcherName" -}}{{ include "kata-deploy.base" . }}-dispatch-retire{{- end -}}
{{- define "kata-deploy.cleanupDispatcherName" -}}{{ include "kata-deploy.base" . }}-dispatch-cleanup{{- end -}}
{{- define "kata-deploy.dispatcherServiceAccount" -}}{{ include "kata-deploy.base" . }}-dispatcher{{- end -}}
{{- define "kata-deploy.nodeServiceAccount" -}}{{ include "kata-deploy.base" . }}-node{{- end -}}
{{- define "kata-deploy.stageConfigName" -}}{{ include "kata-deploy.base" . }}-stage-config{{- end -}}
{{/* job.canary: auto (also when unset, e.g. --reuse-values over an older chart) or a count. */}}
{{- define "kata-deploy.canary" -}}
{{- $c := .Values.job.canary -}}
{{- if or (kindIs "invalid" $c) (eq (toString $c) "auto") -}}auto{{- else -}}{{ $c | int }}{{- end -}}
{{- end -}}
{{- define "kata-deploy.reconcileName" -}}{{ include "kata-deploy.base" . }}-reconcile{{- end -}}
{{/* The release's dispatcher Jobs of these roles (single flight). */}}
{{- define "kata-deploy.runsSelector" -}}
{{- printf "app.kubernetes.io/instance=%s,katacontainers.io/dispatcher-role in (%s)" .root.Release.Name (join "," .roles) -}}
{{- end -}}
{{- define "kata-deploy.rolloutSummaryName" -}}{{ include "kata-deploy.base" . }}-rollout{{- end -}}
{{- define "kata-deploy.jobTemplatesName" -}}{{ include "kata-deploy.base" . }}-job-templates{{- end -}}

{{/* Common labels. */}}
{{- define "kata-deploy.labels" -}}
app.kubernetes.io/name: {{ include "kata-deploy.name" . }}
app.kubernetes.io/instance: {{ .Release.Name | quote }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end -}}

{{- define "kata-deploy.selectorLabels" -}}
app.kubernetes.io/name: {{ include "kata-deploy.name" . }}
app.kubernetes.io/instance: {{ .Release.Name | quote }}
{{- end -}}

{{/*
The record of this install's identity (upstream 4.x uses the same name and keys, so an upgrade
over an upstream release is checked against what that release recorded).
*/}}
{{- define "kata-deploy.stateName" -}}
{{- printf "%s-kata-deploy-state" .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/* Upstream's images. Its kata-deploy image is the Kata release (this chart's payload); its
dispatcher does not contain this chart's binary. */}}
{{- define "kata-deploy.upstreamStageImage" -}}quay.io/kata-containers/kata-deploy{{- end -}}
{{- define "kata-deploy.upstreamDispatcherImage" -}}ghcr.io/kata-containers/k8s-job-dispatcher{{- end -}}

{{/* Whether image.reference names a Kata release image (upstream's values): its last path part is kata-deploy. */}}
{{- define "kata-deploy.imageIsRelease" -}}
{{- include "kata-deploy.bool" (eq (regexReplaceAll ":[^:/]*$" (toString .Values.image.reference) "" | splitList "/" | last) "kata-deploy") -}}
{{- end -}}

{{/* Images. A release image named by image.* (upstream's values) is the payload; the stage image is then this chart's default. */}}
{{- define "kata-deploy.stageImage" -}}
{{- if eq (include "kata-deploy.imageIsRelease" .) "true" -}}
{{- printf "%s:%s" (include "kata-deploy.defaults" . | fromYaml).image.reference .Chart.AppVersion -}}
{{- else -}}
{{- printf "%s:%s" .Values.image.reference (.Values.image.tag | default .Chart.AppVersion) -}}
{{- end -}}
{{- end -}}

{{/*
The Kata release image the host-check / artifacts / prune-artifacts containers run in ("" when
the stage image's own /opt/kata-payload is installed): payload.image, or upstream's
image.reference / image.tag when they name a release image. A digest wins over the tag.
*/}}
{{- define "kata-deploy.payloadImage" -}}
{{- $p := .Values.payload.image -}}
{{- $ref := toString ($p.reference | default "") -}}
{{- $tag := toString ($p.tag | default "") -}}
{{- if eq (include "kata-deploy.imageIsRelease" .) "true" -}}
{{- $ref = toString .Values.image.reference -}}
{{- $tag = toString (.Values.image.tag | default $tag) -}}
{{- end -}}
{{- if $ref -}}
{{- if $p.digest -}}{{- printf "%s@%s" $ref $p.digest -}}{{- else -}}{{- printf "%s:%s" $ref $tag -}}{{- end -}}
{{- end -}}
{{- end -}}
{{- define "kata-deploy.dispatcherImage" -}}
{{- $img := .Values.job.dispatcherImage -}}
{{- if eq (toString $img.reference) (include "kata-deploy.upstreamDispatcherImage" .) -}}
{{- $img = (include "kata-deploy.defaults" . | fromYaml).job.dispatcherImage -}}
{{- end -}}
{{- printf "%s:%s" $img.reference ($img.tag | default .Chart.AppVersion) -}}
{{- end -}}

{{/* true/false from a boolean or a "true"/"false" string (upstream values used strings). */}}
{{- define "kata-deploy.bool" -}}
{{- if eq (toString .) "true" -}}true{{- else -}}false{{- end -}}
{{- end -}}

{{/*
Compile an equality map and a list of label-selector requirements into ONE Kubernetes
label-selector string (comma = AND), the grammar the dispatcher's --selector parses:
  key=value · key in (a,b) · key notin (a,b) · key · !key
Params: dict "eq" <map> "exprs" <list> "what" <value path for error messages>.
*/}}
{{- define "kata-deploy.compileSelector" -}}
{{- $parts := list -}}
{{- range $k, $v := .eq -}}
{{- $parts = append $parts (printf "%s=%s" $k (toString $v)) -}}
{{- end -}}
{{- range $i, $e := .exprs -}}
{{- $where := printf "%s[%d]" $.what $i -}}
{{- if not $e.key -}}{{- fail (printf "%s: 'key' is required" $where) -}}{{- end -}}
{{- $values := $e.values | default list -}}
{{- if or (eq $e.operator "In") (eq $e.operator "NotIn") -}}
{{- if not $values -}}
{{- fail (printf "%s: operator %s needs a non-empty 'values' list (key %s)" $where $e.operator $e.key) -}}
{{- end -}}
{{- $vals := list -}}{{- range $values -}}{{- $vals = append $vals (toString .) -}}{{- end -}}
{{- $parts = append $parts (printf "%s %s (%s)" $e.key (ternary "in" "notin" (eq $e.operator "In")) (join "," $vals)) -}}
{{- else if or (eq $e.operator "Exists") (eq $e.operator "DoesNotExist") -}}
{{- if $values -}}
{{- fail (printf "%s: operator %s takes no 'values' (key %s)" $where $e.operator $e.key) -}}
{{- end -}}
{{- $parts = append $parts (printf "%s%s" (ternary "" "!" (eq $e.operator "Exists")) $e.key) -}}
{{- else -}}
{{- fail (printf "%s: unknown operator %q (key %s): use In, NotIn, Exists or DoesNotExist" $where (toString $e.operator) $e.key) -}}
{{- end -}}
{{- end -}}
{{- join "," $parts -}}
{{- end -}}

{{/*
Label selectors (JSON list of strings, a union: one --selector each) from an equality map, a
list of requirements and upstream's nodeAffinity (required terms, ORed; each term ANDed with the
rest). [] = every node. Params: dict "eq" "exprs" "affinity" (a nodeAffinity) "what".
*/}}
{{- define "kata-deploy.selectors" -}}
{{- $terms := dig "requiredDuringSchedulingIgnoredDuringExecution" "nodeSelectorTerms" list (.affinity | default dict) -}}
{{- $out := list -}}
{{- if $terms -}}
{{- range $i, $t := $terms -}}
{{- $where := printf "%s.requiredDuringSchedulingIgnoredDuringExecution.nodeSelectorTerms[%d]" $.awhat $i -}}
{{- if $t.matchFields -}}
{{- fail (printf "%s.matchFields: a node query cannot select by field; name the nodes with job.nodes (or job.cleanup.nodes) instead" $where) -}}
{{- end -}}
{{- if not $t.matchExpressions -}}
{{- fail (printf "%s: an empty term matches no node in Kubernetes; give it matchExpressions or remove it" $where) -}}
{{- end -}}
{{- range $j, $e := $t.matchExpressions -}}
{{- if has (toString $e.operator) (list "Gt" "Lt") -}}
{{- fail (printf "%s.matchExpressions[%d]: operator %s (key %s) cannot be expressed as a label selector; use In/NotIn/Exists/DoesNotExist, or job.nodes" $where $j $e.operator $e.key) -}}
{{- end -}}
{{- end -}}
{{- $s := include "kata-deploy.compileSelector" (dict "eq" $.eq "exprs" (concat ($.exprs | default list) $t.matchExpressions) "what" (printf "%s (with %s)" $where $.what)) -}}
{{- $out = append $out $s -}}
{{- end -}}
{{- else -}}
{{- $s := include "kata-deploy.compileSelector" (dict "eq" .eq "exprs" (.exprs | default list) "what" .what) -}}
{{- if $s -}}{{- $out = append $out $s -}}{{- end -}}
{{- end -}}
{{- $out | toJson -}}
{{- end -}}

{{/* The install selection as the dispatchers record it (recorded_selection.rs): names win. */}}
{{- define "kata-deploy.installSelectionRecord" -}}
{{- dict "nodes" (.Values.job.nodes | default list) "selectors" (include "kata-deploy.installSelectors" . | fromJsonArray) | toJson -}}
{{- end -}}

{{/*
The install selectors: job.nodeSelector + top-level nodeSelector, job.nodeSelectorExpressions,
top-level affinity. As in upstream 4.x, a top-level toleration of the control-plane taint makes
control-plane nodes eligible: the control-plane exclusions of job.nodeSelectorExpressions are
dropped then.
*/}}
{{- define "kata-deploy.installSelectors" -}}
{{- $eq := merge (dict) (.Values.job.nodeSelector | default dict) (.Values.nodeSelector | default dict) -}}
{{- $cp := list "node-role.kubernetes.io/control-plane" "node-role.kubernetes.io/master" -}}
{{- $tolCP := false -}}
{{- range $t := .Values.tolerations | default list -}}
{{- if or (and (eq (toString $t.operator) "Exists") (not $t.key)) (has (toString $t.key) $cp) -}}{{- $tolCP = true -}}{{- end -}}
{{- end -}}
{{- $exprs := list -}}
{{- range $e := .Values.job.nodeSelectorExpressions | default list -}}
{{- if not (and $tolCP (eq (toString $e.operator) "DoesNotExist") (has (toString $e.key) $cp)) -}}{{- $exprs = append $exprs $e -}}{{- end -}}
{{- end -}}
{{- include "kata-deploy.selectors" (dict "eq" $eq "exprs" $exprs "what" "job.nodeSelectorExpressions"
      "affinity" (dig "nodeAffinity" dict (.Values.affinity | default dict)) "awhat" "affinity.nodeAffinity") -}}
{{- end -}}

{{/*
The node architectures the install selection can contain, as a JSON list (sorted): the four the
shims know, narrowed by kubernetes.io/arch in the selection (job.nodeSelector / nodeSelector
equality, job.nodeSelectorExpressions, and per term of affinity.nodeAffinity, terms ORed).
job.nodes names nodes of any architecture.
*/}}
{{- define "kata-deploy.selectionArches" -}}
{{- $all := list "amd64" "arm64" "ppc64le" "s390x" -}}
{{- if .Values.job.nodes -}}
{{- $all | toJson -}}
{{- else -}}
{{- $eq := merge (dict) (.Values.job.nodeSelector | default dict) (.Values.nodeSelector | default dict) -}}
{{- $base := $all -}}
{{- if hasKey $eq "kubernetes.io/arch" -}}
{{- $base = include "kata-deploy.narrowArches" (dict "arches" $all "exprs" (list (dict "key" "kubernetes.io/arch" "operator" "In" "values" (list (index $eq "kubernetes.io/arch"))))) | fromJsonArray -}}
{{- end -}}
{{- $base = include "kata-deploy.narrowArches" (dict "arches" $base "exprs" (.Values.job.nodeSelectorExpressions | default list)) | fromJsonArray -}}
{{- $terms := dig "nodeAffinity" "requiredDuringSchedulingIgnoredDuringExecution" "nodeSelectorTerms" list (.Values.affinity | default dict) -}}
{{- if $terms -}}
{{- $union := list -}}
{{- range $t := $terms -}}
{{- $union = concat $union (include "kata-deploy.narrowArches" (dict "arches" $base "exprs" ($t.matchExpressions | default list)) | fromJsonArray) -}}
{{- end -}}
{{- $base = $union -}}
{{- end -}}
{{- $base | uniq | sortAlpha | toJson -}}
{{- end -}}
{{- end -}}
{{/* The architectures of .arches that satisfy every kubernetes.io/arch requirement of .exprs (JSON list). */}}
{{- define "kata-deploy.narrowArches" -}}
{{- $out := .arches -}}
{{- range $e := .exprs -}}
{{- if eq (toString $e.key) "kubernetes.io/arch" -}}
{{- $op := toString $e.operator -}}
{{- $vals := list -}}{{- range ($e.values | default list) -}}{{- $vals = append $vals (toString .) -}}{{- end -}}
{{- $keep := list -}}
{{- range $a := $out -}}
{{- if or (eq $op "Exists") (and (eq $op "In") (has $a $vals)) (and (eq $op "NotIn") (not (has $a $vals))) -}}{{- $keep = append $keep $a -}}{{- end -}}
{{- end -}}
{{- $out = $keep -}}
{{- end -}}
{{- end -}}
{{- $out | toJson -}}
{{- end -}}

{{/*
The runtime handlers an installed node of the install selection reports (--expect-handler): the
handler of every enabled shim and custom runtime that the stage installs on EVERY architecture
the selection can contain. The stage leaves a shim out on a node whose architecture is not in its
supportedArches (e.g. qemu-se, s390x only, on amd64), so expecting it there would re-run that
node on every upgrade. As a JSON list (sorted).
*/}}
{{- define "kata-deploy.expectedHandlers" -}}
{{- $arches := include "kata-deploy.selectionArches" . | fromJsonArray -}}
{{- $defaults := (include "kata-deploy.defaults" . | fromYaml).shims -}}
{{- $out := list -}}
{{- $entries := list -}}
{{- range $name := include "kata-deploy.enabledShims" . | fromJsonArray -}}
{{- $cfg := index $.Values.shims $name | default dict -}}
{{- $entries = append $entries (dict "handler" (include "kata-deploy.handler" (dict "root" $ "name" $name))
      "arches" ($cfg.supportedArches | default (index $defaults $name).supportedArches)) -}}
{{- end -}}
{{- range $name := include "kata-deploy.enabledCustomRuntimes" . | fromJsonArray -}}
{{- $cfg := index $.Values.customRuntimes.runtimes $name | default dict -}}
{{- $base := toString $cfg.baseConfig -}}
{{- $entries = append $entries (dict "handler" (include "kata-deploy.customHandler" (dict "root" $ "name" $name))
      "arches" ($cfg.supportedArches | default (index $.Values.shims $base | default dict).supportedArches | default (index $defaults $base | default dict).supportedArches)) -}}
{{- end -}}
{{- range $e := $entries -}}
{{- $supported := list -}}{{- range ($e.arches | default list) -}}{{- $supported = append $supported (toString .) -}}{{- end -}}
{{- $everywhere := true -}}
{{- range $a := $arches -}}{{- if not (has $a $supported) -}}{{- $everywhere = false -}}{{- end -}}{{- end -}}
{{- if $everywhere -}}{{- $out = append $out $e.handler -}}{{- end -}}
{{- end -}}
{{- $out | uniq | sortAlpha | toJson -}}
{{- end -}}

{{/*
Tolerations of the per-node install Jobs: what the DaemonSet controller gives every daemon pod
(the dispatcher places install Jobs by DaemonSet rules and assumes these; carrying them keeps the
kubelet and the taint manager in agreement: a node NotReady while the cri stage restarts the
runtime does not evict the stage), plus the user's tolerations and job.nodeJobs.tolerations.
*/}}
{{- define "kata-deploy.installTolerations" -}}
{{- $ds := list
      (dict "key" "node.kubernetes.io/not-ready" "operator" "Exists" "effect" "NoExecute")
      (dict "key" "node.kubernetes.io/unreachable" "operator" "Exists" "effect" "NoExecute")
      (dict "key" "node.kubernetes.io/disk-pressure" "operator" "Exists" "effect" "NoSchedule")
      (dict "key" "node.kubernetes.io/memory-pressure" "operator" "Exists" "effect" "NoSchedule")
      (dict "key" "node.kubernetes.io/pid-pressure" "operator" "Exists" "effect" "NoSchedule")
      (dict "key" "node.kubernetes.io/unschedulable" "operator" "Exists" "effect" "NoSchedule") -}}
{{- /* startupTaints: the install Jobs must reach the nodes that carry them (they lift them). */ -}}
{{- $startup := list -}}
{{- range include "kata-deploy.startupTaints" . | fromJsonArray -}}
{{- $t := dict "key" .key "operator" "Exists" -}}
{{- if .effect }}{{ $_ := set $t "effect" .effect }}{{ end -}}
{{- $startup = append $startup $t -}}
{{- end -}}
{{- concat $ds (.Values.tolerations | default list) (.Values.job.nodeJobs.tolerations | default list) $startup | uniq | toJson -}}
{{- end -}}

{{/* startupTaints (upstream's key: key[=value][:Effect] strings) as a JSON list of
     {key, effect ("" = any), value, hasValue ("true"/"false")}; a malformed entry fails. */}}
{{- define "kata-deploy.startupTaints" -}}
{{- $out := list -}}
{{- range $t := .Values.startupTaints | default list -}}
{{- $s := toString $t -}}
{{- if not (regexMatch "^[A-Za-z0-9._/-]+(=[^:]*)?(:(NoSchedule|PreferNoSchedule|NoExecute))?$" $s) -}}
{{- fail (printf "startupTaints: %q is not key[=value][:Effect] (Effect: NoSchedule, PreferNoSchedule or NoExecute), e.g. example.com/kata-not-ready:NoSchedule" $s) -}}
{{- end -}}
{{- $effect := "" -}}{{- $rest := $s -}}
{{- if regexMatch ":(NoSchedule|PreferNoSchedule|NoExecute)$" $s -}}
{{- $effect = regexFind "[A-Za-z]+$" $s -}}{{- $rest = trimSuffix (printf ":%s" $effect) $s -}}
{{- end -}}
{{- $kv := splitn "=" 2 $rest -}}
{{- $out = append $out (dict "key" $kv._0 "effect" $effect "value" ($kv._1 | default "") "hasValue" (ternary "true" "false" (contains "=" $rest))) -}}
{{- end -}}
{{- $out | toJson -}}
{{- end -}}

{{/*
The cleanup selectors. Default (nothing configured): nodes with the kata-runtime label OR this
install's claimed marker (katacontainers.io/kata-deploy-claimed[-<suffix>], set by the stages
before the host is touched).
*/}}
{{- define "kata-deploy.cleanupSelectors" -}}
{{- $c := .Values.job.cleanup | default dict -}}
{{- $sel := include "kata-deploy.selectors" (dict "eq" ($c.nodeSelector | default dict) "exprs" ($c.nodeSelectorExpressions | default list) "what" "job.cleanup.nodeSelectorExpressions"
      "affinity" ($c.nodeAffinity | default dict) "awhat" "job.cleanup.nodeAffinity") | fromJsonArray -}}
{{- if eq ($sel | toJson) (list "katacontainers.io/kata-runtime" | toJson) -}}
{{- /* Upstream's default (kata-runtime Exists) means "every node an install touched": here that
       also takes this install's claimed marker (upstream marks with kata-runtime=false instead). */ -}}
{{- concat $sel (list (include "kata-deploy.claimedLabel" .) (include "kata-deploy.stateLabel" .)) | toJson -}}
{{- else if $sel -}}
{{- $sel | toJson -}}
{{- else -}}
{{- /* The state label too: a node whose install failed before its claim (host-check) says
       failed; uninstall cleans it (nothing to undo) and removes that state. */ -}}
{{- list "katacontainers.io/kata-runtime" (include "kata-deploy.claimedLabel" .) (include "kata-deploy.stateLabel" .) | toJson -}}
{{- end -}}
{{- end -}}

{{/* Per-install node labels set by the stages (claimed: before the first host change; marker: once installed). */}}
{{- define "kata-deploy.claimedLabel" -}}
{{- include "kata-deploy.suffixed" (dict "root" . "base" "katacontainers.io/kata-deploy-claimed") -}}
{{- end -}}
{{- define "kata-deploy.markerLabel" -}}
{{- include "kata-deploy.suffixed" (dict "root" . "base" "katacontainers.io/kata-deploy-installed") -}}
{{- end -}}
{{/* Per-install node state (kubectl get nodes -L <key>): pending / failed (dispatcher), installing / installed / cleaning (stages). */}}
{{- define "kata-deploy.stateLabel" -}}
{{- include "kata-deploy.suffixed" (dict "root" . "base" "katacontainers.io/kata-deploy-state") -}}
{{- end -}}
{{- define "kata-deploy.suffixed" -}}
{{- if .root.Values.env.multiInstallSuffix -}}{{- printf "%s-%s" .base .root.Values.env.multiInstallSuffix -}}{{- else -}}{{- .base -}}{{- end -}}
{{- end -}}

{{/* Built-in shim names: the keys of this chart's default shims (upstream's current list). */}}
{{- define "kata-deploy.knownShims" -}}
{{- without (keys (include "kata-deploy.defaults" . | fromYaml).shims | sortAlpha) "disableAll" | toJson -}}
{{- end -}}
{{/* Names of an earlier version of this chart (not upstream's): ignored unless enabled: true (refused). */}}
{{- define "kata-deploy.legacyShims" -}}
{{- toJson (dict "cloud-hypervisor" "clh-runtime-rs" "stratovirt" "") -}}
{{- end -}}

{{/* Names of the enabled built-in shims, as a JSON list (sorted). */}}
{{- define "kata-deploy.enabledShims" -}}
{{- $disableAll := eq (include "kata-deploy.bool" (.Values.shims.disableAll | default false)) "true" -}}
{{- $known := include "kata-deploy.knownShims" . | fromJsonArray -}}
{{- $out := list -}}
{{- range $name, $cfg := .Values.shims -}}
{{- if has $name $known -}}
{{- $cfg = $cfg | default dict -}}
{{- $on := not $disableAll -}}
{{- if hasKey $cfg "enabled" -}}
{{- if not (kindIs "invalid" $cfg.enabled) -}}{{- $on = eq (include "kata-deploy.bool" $cfg.enabled) "true" -}}{{- end -}}
{{- end -}}
{{- if $on -}}{{- $out = append $out $name -}}{{- end -}}
{{- end -}}
{{- end -}}
{{- $out | toJson -}}
{{- end -}}

{{/* Names of the enabled custom runtimes, as a JSON list (sorted). */}}
{{- define "kata-deploy.enabledCustomRuntimes" -}}
{{- $out := list -}}
{{- if and .Values.customRuntimes (eq (include "kata-deploy.bool" (.Values.customRuntimes.enabled | default false)) "true") -}}
{{- range $name, $_ := (.Values.customRuntimes.runtimes | default dict) -}}{{- $out = append $out $name -}}{{- end -}}
{{- end -}}
{{- $out | toJson -}}
{{- end -}}

{{/* The handler (and default RuntimeClass name) of a shim or custom runtime: kata-<name>[-<suffix>]. */}}
{{- define "kata-deploy.handler" -}}
{{- include "kata-deploy.suffixed" (dict "root" .root "base" (printf "kata-%s" .name)) -}}
{{- end -}}

{{/* The user's RuntimeClass of a custom runtime, parsed ({} when none). Params: dict "root" "name". */}}
{{- define "kata-deploy.customClass" -}}
{{- $cfg := index .root.Values.customRuntimes.runtimes .name | default dict -}}
{{- if $cfg.runtimeClass -}}{{- $cfg.runtimeClass | fromYaml | toJson -}}{{- else -}}{}{{- end -}}
{{- end -}}

{{/* The handler of a custom runtime: the one of its RuntimeClass, else kata-<name>[-<suffix>]. */}}
{{- define "kata-deploy.customHandler" -}}
{{- $rc := include "kata-deploy.customClass" . | fromJson -}}
{{- $rc.handler | default (include "kata-deploy.handler" .) -}}
{{- end -}}

{{/*
The stage's name of a custom runtime (the host paths of its configuration). A handler of the
derived form kata-<name>[-<suffix>] gives <name> (what earlier versions of this chart used, so
upgrades keep their paths); any other handler (the user's own, as upstream accepts) gives the
runtime's key in customRuntimes.runtimes.
*/}}
{{- define "kata-deploy.customStageName" -}}
{{- $h := include "kata-deploy.customHandler" . -}}
{{- $suffix := .root.Values.env.multiInstallSuffix | default "" | toString -}}
{{- $n := trimPrefix "kata-" $h -}}
{{- if $suffix -}}{{- $n = trimSuffix (printf "-%s" $suffix) $n -}}{{- end -}}
{{- if eq (include "kata-deploy.handler" (dict "root" .root "name" $n)) $h -}}{{- $n -}}{{- else -}}{{- .name -}}{{- end -}}
{{- end -}}

{{/* Pod overhead of each built-in shim. */}}
{{- define "kata-deploy.overheads" -}}
{{- $small := dict "memory" "130Mi" "cpu" "250m" -}}
{{- $qemu := dict "memory" "320Mi" "cpu" "250m" -}}
{{- $gpu := dict "memory" "10240Mi" "cpu" "1" -}}
{{- $tee := dict "memory" "2048Mi" "cpu" "1" -}}
{{- $se := dict "memory" "1024Mi" "cpu" "1" -}}
{{- toYaml (dict
  "clh" $small "clh-azure" $small "clh-runtime-rs" $small "clh-azure-runtime-rs" $small
  "openvmm-azure-runtime-rs" $small "dragonball" $small "fc" $small
  "qemu" $qemu "qemu-runtime-rs" $qemu "qemu-coco-dev-runtime-rs" $qemu
  "qemu-coco-dev" (dict "memory" "160Mi" "cpu" "250m")
  "qemu-nvidia-cpu" $qemu "qemu-nvidia-cpu-runtime-rs" $qemu
  "qemu-nvidia-gpu" $gpu "qemu-nvidia-gpu-runtime-rs" $gpu
  "qemu-nvidia-gpu-snp" $gpu "qemu-nvidia-gpu-snp-runtime-rs" $gpu
  "qemu-nvidia-gpu-tdx" $gpu "qemu-nvidia-gpu-tdx-runtime-rs" $gpu
  "qemu-snp" $tee "qemu-snp-runtime-rs" $tee "qemu-tdx" $tee "qemu-tdx-runtime-rs" $tee
  "qemu-se" $se "qemu-se-runtime-rs" $se
  "remote" (dict "memory" "120Mi" "cpu" "250m")
) -}}
{{- end -}}

{{/*
The NFD node selector auto-injected for a TEE shim (empty for others), as YAML.
SEV-SNP and TDX by name; IBM SEL for -se / -se-runtime-rs. Pure TEE shims only, as upstream's
$isPureTeeShim: the confidential-GPU classes get only their own runtimeClass.nodeSelector (GPU
Operator's labels, and the feature label upstream's values put there), never an injected one.
*/}}
{{- define "kata-deploy.nfdSelector" -}}
{{- $s := .shim -}}
{{- if not (contains "nvidia-gpu" $s) -}}
{{- if contains "snp" $s }}
amd.feature.node.kubernetes.io/snp: "true"
{{- else if contains "tdx" $s }}
intel.feature.node.kubernetes.io/tdx: "true"
{{- else if or (hasSuffix "-se" $s) (hasSuffix "-se-runtime-rs" $s) }}
feature.node.kubernetes.io/cpu-security.se.enabled: "true"
{{- end -}}
{{- end -}}
{{- end -}}

{{/*
Whether NFD is present: declared with nfd.enabled, or found by lookup of a
node-feature-discovery-worker DaemonSet (lookup returns nothing during helm template).
*/}}
{{- define "kata-deploy.nfdPresent" -}}
{{- if eq (include "kata-deploy.bool" .Values.nfd.enabled) "true" -}}
true
{{- else -}}
{{- $found := false -}}
{{- $all := lookup "apps/v1" "DaemonSet" "" "" -}}
{{- range $ds := ($all.items | default list) -}}
{{- if hasSuffix "node-feature-discovery-worker" $ds.metadata.name -}}{{- $found = true -}}{{- end -}}
{{- end -}}
{{- $found -}}
{{- end -}}
{{- end -}}

{{/* The stage's containerd snapshotter of a shim: nydus or "" (devmapper/erofs: no effect, see NOTES). */}}
{{- define "kata-deploy.stageSnapshotter" -}}
{{- $s := dig "containerd" "snapshotter" "" (. | default dict) | toString -}}
{{- ternary "nydus" "" (eq $s "nydus") -}}
{{- end -}}
{{/* The stage's CRI-O pull type: crio.pullType, or guest-pull for upstream's crio.guestPull: true. */}}
{{- define "kata-deploy.stagePullType" -}}
{{- $crio := dig "crio" dict (. | default dict) | default dict -}}
{{- if $crio.pullType -}}{{- $crio.pullType -}}
{{- else if eq (include "kata-deploy.bool" ($crio.guestPull | default false)) "true" -}}guest-pull
{{- end -}}
{{- end -}}

{{/* The stage configuration entry of one shim or custom runtime. Params: dict "name" "base" "cfg" "arches" "handler" (custom runtimes only). */}}
{{- define "kata-deploy.stageShimEntry" -}}
{{- $cfg := .cfg | default dict }}
- name: {{ .name | toJson }}
  {{- with .handler }}
  handler: {{ . | toJson }}
  {{- end }}
  baseConfig: {{ .base | toJson }}
  supportedArches: {{ .arches | default list | toJson }}
  dropIn: {{ $cfg.dropIn | default "" | toJson }}
  allowedHypervisorAnnotations: {{ $cfg.allowedHypervisorAnnotations | default list | toJson }}
  containerdSnapshotter: {{ include "kata-deploy.stageSnapshotter" $cfg | toJson }}
  crioPullType: {{ include "kata-deploy.stagePullType" $cfg | toJson }}
  {{- /* Upstream's agent.* and containerd.forceGuestPull: written only when set, so the configuration (and its hash) of installs without them stays the same. */}}
  {{- with dig "agent" "httpsProxy" "" $cfg | default "" | toString }}
  agentHttpsProxy: {{ . | toJson }}
  {{- end }}
  {{- with dig "agent" "noProxy" "" $cfg | default "" | toString }}
  agentNoProxy: {{ . | toJson }}
  {{- end }}
  {{- if eq (include "kata-deploy.bool" (dig "containerd" "forceGuestPull" false $cfg)) "true" }}
  forceGuestPull: true
  {{- end }}
{{- end -}}

{{/* Effective settings that upstream spells differently (upstream's key wins when present). */}}
{{- define "kata-deploy.debug" -}}
{{- include "kata-deploy.bool" (or (eq (include "kata-deploy.bool" .Values.debug) "true") (eq (include "kata-deploy.bool" .Values.env.debug) "true")) -}}
{{- end -}}
{{- define "kata-deploy.cri" -}}
{{- $d := toString .Values.k8sDistribution -}}
{{- if and (eq .Values.stage.cri "auto") (has $d (list "rke2" "k0s" "microk8s")) -}}{{- $d -}}{{- else -}}{{- .Values.stage.cri -}}{{- end -}}
{{- end -}}
{{- define "kata-deploy.labelReadyTimeout" -}}
{{- if hasKey .Values.job "waitNodeReadySeconds" -}}{{- .Values.job.waitNodeReadySeconds | int -}}{{- else -}}{{- .Values.stage.labelReadyTimeoutSeconds | int -}}{{- end -}}
{{- end -}}
{{- define "kata-deploy.requireNodes" -}}
{{- if hasKey .Values.job "waitForNodesSeconds" -}}{{- include "kata-deploy.bool" (gt (.Values.job.waitForNodesSeconds | int) 0) -}}
{{- else -}}{{- include "kata-deploy.bool" .Values.job.requireNodes -}}{{- end -}}
{{- end -}}
{{- define "kata-deploy.settle" -}}
{{- if .Values.job.settle -}}{{- .Values.job.settle -}}
{{- else if gt (.Values.job.nodeSettleSeconds | default 0 | int) 0 -}}{{- printf "%ds" (.Values.job.nodeSettleSeconds | int) -}}
{{- end -}}
{{- end -}}

{{/* The host install directory as configured (upstream's env.installationPrefix wins); the stage appends -<suffix>. */}}
{{- define "kata-deploy.installDir" -}}
{{- .Values.env.installationPrefix | default .Values.stage.installPrefix | toString -}}
{{- end -}}

{{/* The one stage configuration file (see ARCHITECTURE.md; parsed with deny_unknown_fields). */}}
{{- define "kata-deploy.stageConfig" -}}
{{- $shims := include "kata-deploy.enabledShims" . | fromJsonArray -}}
{{- $customs := include "kata-deploy.enabledCustomRuntimes" . | fromJsonArray -}}
multiInstallSuffix: {{ .Values.env.multiInstallSuffix | default "" | toJson }}
debug: {{ include "kata-deploy.debug" . }}
installPrefix: {{ include "kata-deploy.installDir" . | toJson }}
imagePullTimeoutSeconds: {{ .Values.imagePullTimeoutSeconds | int }}
cri: {{ include "kata-deploy.cri" . | toJson }}
restart: {{ .Values.stage.restart | toJson }}
runtimeReadyTimeoutSeconds: {{ .Values.stage.runtimeReadyTimeoutSeconds | int }}
labelReadyTimeoutSeconds: {{ include "kata-deploy.labelReadyTimeout" . }}
{{- with .Values.startupTaints }}
startupTaints: {{ toJson . }}
{{- end }}
runningPodsWaitSeconds: {{ .Values.stage.runningKataPods.waitSeconds | int }}
forceHandlerRemoval: {{ include "kata-deploy.bool" .Values.stage.runningKataPods.force }}
{{- if or $shims $customs }}
shims:
{{- range $name := $shims }}
{{- $cfg := index $.Values.shims $name | default dict }}
{{- include "kata-deploy.stageShimEntry" (dict "name" $name "base" $name "cfg" $cfg "arches" $cfg.supportedArches) }}
{{- end }}
{{- range $name := $customs }}
{{- $cfg := index $.Values.customRuntimes.runtimes $name | default dict }}
{{- $baseCfg := index $.Values.shims (toString $cfg.baseConfig) | default dict }}
{{- $stageName := include "kata-deploy.customStageName" (dict "root" $ "name" $name) }}
{{- $handler := include "kata-deploy.customHandler" (dict "root" $ "name" $name) }}
{{- /* The handler is passed only when it is not the derived one: the configuration (and its hash) of earlier installs stays the same. */}}
{{- $own := ternary "" $handler (eq $handler (include "kata-deploy.handler" (dict "root" $ "name" $stageName))) }}
{{- include "kata-deploy.stageShimEntry" (dict "name" $stageName "handler" $own "base" $cfg.baseConfig "cfg" $cfg "arches" ($cfg.supportedArches | default $baseCfg.supportedArches)) }}
{{- end }}
{{- else }}
shims: []
{{- end }}
{{- end -}}

{{/*
Pod-level settings shared by both per-node Job templates. Params: dict "root" "tolerations"
"payload" (the install Job: the kata-stage emptyDir when the payload is a release image).
No ServiceAccount token is mounted by default: only the containers that change the Node get
the projected, pod-bound token volume below (stageContainer "api": true).
*/}}
{{- define "kata-deploy.nodePodCommon" -}}
{{- $v := .root.Values -}}
serviceAccountName: {{ include "kata-deploy.nodeServiceAccount" .root }}
automountServiceAccountToken: false
enableServiceLinks: false
restartPolicy: Never
{{- if eq (include "kata-deploy.systemdViaPid1" .root) "true" }}
# The cri / revert-cri stages restart the CRI through the host's systemd (PID 1).
hostPID: true
{{- end }}
{{- with ($v.job.nodeJobs.priorityClassName | default $v.priorityClassName) }}
priorityClassName: {{ . | quote }}
{{- end }}
{{- with $v.imagePullSecrets }}
imagePullSecrets:
{{- toYaml . | nindent 2 }}
{{- end }}
{{- with .tolerations }}
tolerations:
{{- toYaml . | nindent 2 }}
{{- end }}
volumes:
  - name: stage-config
    configMap:
      name: {{ include "kata-deploy.stageConfigName" .root }}
{{- if and .payload (include "kata-deploy.payloadImage" .root) }}
  # The stage binary, copied by copy-stage, run by the containers in the release image.
  - name: kata-stage
    emptyDir:
      sizeLimit: 64Mi
{{- end }}
  - name: host-root
    hostPath:
      path: /
      type: Directory
{{- if eq (include "kata-deploy.preciseMounts" .root) "true" }}
{{- range $name, $w := include "kata-deploy.hostWrites" .root | fromJson }}
  - name: {{ $name }}
    hostPath:
      path: {{ $w.path | quote }}
      type: {{ $w.type }}
{{- end }}
{{- end }}
  # The kubelet's usual API access volume, but mounted only where it is used. The token is
  # bound to this pod (and, Kubernetes >= 1.30, names its node: see node-scope-policy.yaml).
  - name: api-access
    projected:
      defaultMode: 292   # 0444
      sources:
        - serviceAccountToken:
            path: token
            expirationSeconds: 3607
        - configMap:
            name: kube-root-ca.crt
            items: [{key: ca.crt, path: ca.crt}]
        - downwardAPI:
            items:
              - path: namespace
                fieldRef: {fieldPath: metadata.namespace}
{{- end -}}

{{/* Extra labels / annotations of the per-node pods (podLabels / podAnnotations; ours win). */}}
{{- define "kata-deploy.podMeta" -}}
{{- $labels := merge (dict "katacontainers.io/stages" .stages) (include "kata-deploy.selectorLabels" .root | fromYaml) (omit (.root.Values.podLabels | default dict) "name") -}}
labels:
  {{- toYaml $labels | nindent 2 }}
{{- $ours := dict "katacontainers.io/config-hash" .hash -}}
{{- /* stage.cri auto with precise mounts: the dispatcher points this volume at each node's own
       CRI configuration directory (from the node's runtime version, labels and annotations). */ -}}
{{- if eq (include "kata-deploy.criDirPerNode" .root) "true" -}}
{{- $_ := set $ours "katacontainers.io/cri-config-volume" "host-cri-config" -}}
{{- end }}
annotations:
  {{- toYaml (merge $ours (.root.Values.podAnnotations | default dict)) | nindent 2 }}
{{- end -}}

{{/* Whether the dispatcher chooses each node's CRI configuration directory (stage.cri auto). */}}
{{- define "kata-deploy.criDirPerNode" -}}
{{- $flavour := include "kata-deploy.cri" . -}}
{{- include "kata-deploy.bool" (and (eq (include "kata-deploy.preciseMounts" .) "true") (eq $flavour "auto") (ne (toString .Values.k8sDistribution) "k3s")) -}}
{{- end -}}

{{/*
One per-node stage container. Params: dict "root" "name" "stage" "access" "api" "payload".
payload: the stage reads the payload (host-check, artifacts, prune-artifacts): with a release
image (payload.image) it runs in that image, from the kata-stage emptyDir.
api: mount the projected ServiceAccount token (only the stages that change the Node).
access: none (API only, non-root), read (host root read-only), write (host root read-write, root),
privileged (host root read-write, privileged: restarts the CRI).
*/}}
{{- define "kata-deploy.stageContainer" -}}
{{- $v := .root.Values -}}
{{- $release := and .payload (include "kata-deploy.payloadImage" .root) -}}
- name: {{ .name }}
  {{- if $release }}
  # Our static stage binary (copied by copy-stage) run inside the Kata release image, where the
  # payload is (/opt/kata-artifacts); the image itself has no shell and is used unchanged.
  image: {{ include "kata-deploy.payloadImage" .root }}
  imagePullPolicy: {{ $v.imagePullPolicy }}
  command: ["/kata-stage/kata-deploy-stage"]
  args: ["--config", "/etc/kata-deploy/config.yaml", "--host-root", "/host", "--payload", "/opt/kata-artifacts", {{ .stage | quote }}]
  {{- else }}
  image: {{ include "kata-deploy.stageImage" .root }}
  imagePullPolicy: {{ $v.imagePullPolicy }}
  args: ["--config", "/etc/kata-deploy/config.yaml", "--host-root", "/host", {{ .stage | quote }}]
  {{- end }}
  env:
    # The claim / unclaim containers mark the node: the host stages make no API call.
    - name: KATA_STAGE_CLAIMS
      value: external
  {{- with ($v.resources | default $v.job.nodeJobs.resources) }}
  resources:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  volumeMounts:
    - name: stage-config
      mountPath: /etc/kata-deploy
      readOnly: true
  {{- if $release }}
    - name: kata-stage
      mountPath: /kata-stage
      readOnly: true
  {{- end }}
  {{- if .api }}
    - name: api-access
      mountPath: /var/run/secrets/kubernetes.io/serviceaccount
      readOnly: true
  {{- end }}
  {{- $precise := and (eq .access "write") (eq (include "kata-deploy.preciseMounts" .root) "true") }}
  {{- if ne .access "none" }}
    - name: host-root
      mountPath: /host
      {{- if or (eq .access "read") $precise }}
      readOnly: true
      # Also the host's submounts (/run, /var/lib/kubelet/pods, a separate /var or /boot...)
      # where the runtime can (containerd >= 2.0, runc >= 1.1, Linux >= 5.12); else as before.
      recursiveReadOnly: IfPossible
      {{- end }}
  {{- end }}
  {{- if $precise }}
  {{- /* Writable, over the read-only host root: only what this stage writes (stage.hostMounts). */}}
  {{- range $name, $w := include "kata-deploy.hostWrites" .root | fromJson }}
  {{- if has $.stage $w.stages }}
    - name: {{ $name }}
      mountPath: {{ printf "/host%s" $w.path | quote }}
  {{- end }}
  {{- end }}
  {{- end }}
  securityContext:
  {{- if eq .access "none" }}
    runAsNonRoot: true
    runAsUser: 65532
    runAsGroup: 65532
    privileged: false
    allowPrivilegeEscalation: false
    readOnlyRootFilesystem: true
    capabilities:
      drop: ["ALL"]
    seccompProfile:
      type: RuntimeDefault
  {{- else if eq .access "read" }}
    runAsUser: 0
    privileged: false
    allowPrivilegeEscalation: false
    readOnlyRootFilesystem: true
    capabilities:
      drop: ["ALL"]
      add: ["DAC_READ_SEARCH"]
    seccompProfile:
      type: RuntimeDefault
  {{- else if eq .access "write" }}
    runAsUser: 0
    privileged: false
    allowPrivilegeEscalation: false
    readOnlyRootFilesystem: true
    capabilities:
      drop: ["ALL"]
      add: ["CHOWN", "DAC_OVERRIDE", "FOWNER", "FSETID"]
    seccompProfile:
      type: RuntimeDefault
    {{- with $v.job.nodeJobs.seLinuxOptions }}
    seLinuxOptions:
      {{- toYaml . | nindent 6 }}
    {{- end }}
  {{- else }}
    runAsUser: 0
    privileged: true
    readOnlyRootFilesystem: true
  {{- end }}
{{- end -}}

{{/*
The install Job's first init container when the payload is a release image: the stage binary
copies itself into the kata-stage emptyDir (no shell needed). Non-root, no host, no token.
*/}}
{{- define "kata-deploy.copyStageContainer" -}}
{{- $v := .Values -}}
- name: copy-stage
  image: {{ include "kata-deploy.stageImage" . }}
  imagePullPolicy: {{ $v.imagePullPolicy }}
  args: ["copy-self", "--copy-to", "/kata-stage/kata-deploy-stage"]
  {{- with ($v.resources | default $v.job.nodeJobs.resources) }}
  resources:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  volumeMounts:
    - name: kata-stage
      mountPath: /kata-stage
  securityContext:
    runAsNonRoot: true
    runAsUser: 65532
    runAsGroup: 65532
    privileged: false
    allowPrivilegeEscalation: false
    readOnlyRootFilesystem: true
    capabilities:
      drop: ["ALL"]
    seccompProfile:
      type: RuntimeDefault
{{- end -}}

{{/*
A dispatcher hook Job. Params: dict "root" "name" "prefix" "template" "hook" "deletePolicy"
"nodes" (list) "selectors" (list of strings) "role" (install|cleanup|retire), and for retire
"exceptNodes" (list) / "exceptSelectors" (list of strings): the install selection to leave out.
*/}}
{{- define "kata-deploy.dispatcherJob" -}}
{{- $r := .root -}}{{- $v := $r.Values -}}
apiVersion: batch/v1
kind: Job
metadata:
  name: {{ .name }}
  namespace: {{ $r.Release.Namespace }}
  labels:
    {{- include "kata-deploy.labels" $r | nindent 4 }}
    katacontainers.io/dispatcher-role: {{ .role }}
  {{- if .hook }}
  annotations:
    "helm.sh/hook": {{ .hook }}
    "helm.sh/hook-weight": {{ ternary "1" "0" (eq .role "retire") | quote }}
    "helm.sh/hook-delete-policy": {{ .deletePolicy }}
  {{- end }}
spec:
  # A dead dispatcher is not retried blindly: the failure surfaces in helm; re-run helm upgrade.
  backoffLimit: 0
  # Bounded: the dispatcher's own --deadline plus a margin to report.
  activeDeadlineSeconds: {{ add ($v.job.deadlineSeconds | int) 120 }}
  ttlSecondsAfterFinished: {{ $v.job.ttlSecondsAfterFinished | int }}
  template:
    metadata:
      labels:
        {{- include "kata-deploy.selectorLabels" $r | nindent 8 }}
        katacontainers.io/dispatcher-role: {{ .role }}
    spec:
      serviceAccountName: {{ include "kata-deploy.dispatcherServiceAccount" $r }}
      automountServiceAccountToken: true
      restartPolicy: Never
      enableServiceLinks: false
      {{- with $v.job.dispatcher.priorityClassName }}
      priorityClassName: {{ . | quote }}
      {{- end }}
      {{- with $v.imagePullSecrets }}
      imagePullSecrets:
        {{- toYaml . | nindent 8 }}
      {{- end }}
      {{- with (merge (dict) ($v.job.dispatcher.nodeSelector | default dict) ($v.job.dispatcherNodeSelector | default dict)) }}
      nodeSelector:
        {{- toYaml . | nindent 8 }}
      {{- end }}
      {{- with ($v.job.dispatcher.tolerations | default $v.job.dispatcherTolerations | default $v.tolerations) }}
      tolerations:
        {{- toYaml . | nindent 8 }}
      {{- end }}
      securityContext:
        runAsNonRoot: true
        runAsUser: 65532
        runAsGroup: 65532
        seccompProfile:
          type: RuntimeDefault
      containers:
        - name: dispatcher
          image: {{ include "kata-deploy.dispatcherImage" $r }}
          imagePullPolicy: {{ $v.imagePullPolicy }}
          args:
            - --template
            - /etc/kata-deploy-dispatcher/{{ .template }}
            - --name-prefix
            - {{ .prefix }}
            - --parallelism
            - {{ $v.job.parallelism | int | quote }}
            {{- if .name }}
            - --owner-job
            - {{ .name }}
            {{- end }}
            {{- if .nodes }}
            - --nodes
            - {{ join "," .nodes | quote }}
            {{- else }}
            {{- range .selectors }}
            - --selector
            - {{ . | quote }}
            {{- end }}
            {{- end }}
            - --deadline
            - {{ printf "%ds" ($v.job.deadlineSeconds | int) }}
            - --max-failures
            - {{ (kindIs "string" $v.job.maxFailures) | ternary $v.job.maxFailures ($v.job.maxFailures | int | toString) | quote }}
            {{- /* settle: only an install selection by label can change while it is read. */}}
            {{- $settle := include "kata-deploy.settle" $r }}
            {{- if and (eq .role "install") (not .nodes) $settle }}
            - --settle
            - {{ $settle | quote }}
            {{- end }}
            # job.notReadyNodes: a node that needs a Job and stays NotReady past the grace.
            {{- $nr := $v.job.notReadyNodes | default "skip" }}
            - --unready
            - {{ ternary "skip" "fail" (eq $nr "skip") }}
            {{- if eq $nr "wait" }}
            - --unready-grace
            - {{ printf "%ds" ($v.job.deadlineSeconds | int) }}
            {{- end }}
            {{- if and (eq .role "install") (eq (include "kata-deploy.requireNodes" $r) "true") }}
            - --require-nodes
            {{- end }}
            {{- if has .role (list "install" "reconcile") }}
            # A node gets no Job only when the whole Node shows this very template installed: its
            # record katacontainers.io/installed-by-<prefix> (written after each success) names this
            # template and the node's current machine ID, it carries this install's marker label,
            # and its runtime handlers (when it reports any) include ours. An unchanged upgrade is a
            # no-op; anything else re-runs the node.
            - --skip-installed
            - --installed-label
            - {{ printf "%s=true" (include "kata-deploy.markerLabel" .root) | quote }}
            {{- range include "kata-deploy.expectedHandlers" .root | fromJsonArray }}
            - --expect-handler
            - {{ . | quote }}
            {{- end }}
            # job.canary: the first wave must succeed before any other node starts.
            - --canary
            - {{ include "kata-deploy.canary" .root | quote }}
            {{- if and (eq .role "install") (eq (include "kata-deploy.bool" ($v.job.reinstallAll | default false)) "true") }}
            # job.reinstallAll: every selected node runs again, whatever its record says.
            - --reinstall-all
            {{- end }}
            {{- end }}
            {{- if eq .role "cleanup" }}
            # Uninstall reaches every node it must clean, tainted or not; it first stops this
            # release's install dispatcher and waits until none of its Jobs or pods is left.
            - --ignore-taints
            - --supersede-job
            - {{ include "kata-deploy.installDispatcherName" .root }}
            - --supersede-prefix
            - {{ include "kata-deploy.installPrefix" .root }}
            # Helm never deletes hook resources on uninstall: once every node is clean, remove the
            # install (and a failed retire) dispatcher Job too (their per-node Jobs follow through
            # their ownerReference).
            - --remove-on-success
            - {{ printf "%s,%s" (include "kata-deploy.installDispatcherName" .root) (include "kata-deploy.retireDispatcherName" .root) }}
            {{- if (($v.job.reconcile | default dict).schedule) }}
            # The reconcile CronJob goes first, so no scheduled run starts during or after uninstall.
            - --remove-cronjob
            - {{ include "kata-deploy.reconcileName" .root }}
            {{- end }}
            {{- end }}
            {{- if has .role (list "install" "retire" "cleanup") }}
            # Single flight: a hook run first stops the release's scheduled reconcile runs.
            - --supersede-runs
            - {{ include "kata-deploy.runsSelector" (dict "root" .root "roles" (list "reconcile")) | quote }}
            {{- else }}
            # Single flight: a scheduled run yields to an active hook run of the release.
            - --yield-to
            - {{ include "kata-deploy.runsSelector" (dict "root" .root "roles" (list "install" "retire" "cleanup")) | quote }}
            {{- end }}
            {{- if and (eq .role "install") .root.Release.IsInstall }}
            # A first install records its selection once every node succeeded (the retire run of
            # a later upgrade compares with it); a rollback to this revision keeps a newer record.
            - --record-selection
            - {{ include "kata-deploy.installSelectionRecord" .root | quote }}
            - --record-if-absent
            {{- end }}
            {{- if eq .role "retire" }}
            # Nodes this install claimed that a change of values dropped (covered by the recorded
            # selection, not by this one) get the cleanup template (tainted or not) and lose the
            # install record; once all succeeded, this selection is recorded.
            - --within-recorded
            - --record-selection
            - {{ include "kata-deploy.installSelectionRecord" .root | quote }}
            - --ignore-taints
            - --forget-record
            - {{ include "kata-deploy.installPrefix" .root }}
            {{- if .exceptNodes }}
            - --except-nodes
            - {{ join "," .exceptNodes | quote }}
            {{- end }}
            {{- range .exceptSelectors }}
            - --except-selector
            - {{ . | quote }}
            {{- end }}
            {{- end }}
            # What kubectl shows of the run: the node state label (pending before a node's Job is
            # created, failed when it failed) and the summary under the role's key of the
            # rollout ConfigMap (counts, ETA, failed nodes with their reasons).
            - --state-label
            - {{ include "kata-deploy.stateLabel" .root | quote }}
            - --summary-configmap
            - {{ include "kata-deploy.rolloutSummaryName" .root }}
            - --summary-key
            - {{ .role }}
            - --log-format
            - {{ $v.job.logFormat }}
          env:
            - name: POD_NAMESPACE
              valueFrom:
                fieldRef:
                  fieldPath: metadata.namespace
            {{- if not .name }}
            # A CronJob's Job has a generated name: the owner is the Job this pod belongs to.
            - name: DISPATCHER_OWNER_JOB
              valueFrom:
                fieldRef:
                  fieldPath: metadata.labels['batch.kubernetes.io/job-name']
            {{- end }}
          {{- with $v.job.dispatcher.resources }}
          resources:
            {{- toYaml . | nindent 12 }}
          {{- end }}
          securityContext:
            runAsNonRoot: true
            runAsUser: 65532
            runAsGroup: 65532
            privileged: false
            allowPrivilegeEscalation: false
            readOnlyRootFilesystem: true
            capabilities:
              drop: ["ALL"]
            seccompProfile:
              type: RuntimeDefault
          volumeMounts:
            - name: job-templates
              mountPath: /etc/kata-deploy-dispatcher
              readOnly: true
      volumes:
        - name: job-templates
          configMap:
            name: {{ include "kata-deploy.jobTemplatesName" $r }}
{{- end -}}

{{/* The shim of the default RuntimeClass: defaultShim for the first architecture that sets one. */}}
{{- define "kata-deploy.defaultShim" -}}
{{- $d := .Values.defaultShim | default dict -}}
{{- $d.amd64 | default $d.arm64 | default $d.s390x | default $d.ppc64le | default "" -}}
{{- end -}}
{{/* Whether the default RuntimeClass is created (never with a suffix: the name would clash between installs). */}}
{{- define "kata-deploy.createDefault" -}}
{{- include "kata-deploy.bool" (and (eq (include "kata-deploy.bool" .Values.runtimeClasses.createDefault) "true") (not .Values.env.multiInstallSuffix)) -}}
{{- end -}}

{{/*
The upstream keys that are set but have no effect in this chart, with the reason: one
"key: reason" line each (NOTES.txt lists them; hack/test-chart.sh checks them).
*/}}
{{- define "kata-deploy.noEffect" -}}
{{- $v := .Values -}}
{{- $out := list -}}
{{- $ds := "this chart runs no DaemonSet (nothing stays running on the nodes)" -}}
{{- range $k := list "updateStrategy" "health" "kubectlImage" -}}
{{- if hasKey $v $k -}}{{- $out = append $out (printf "%s: %s" $k (ternary "the stages talk to the API directly, no kubectl" $ds (eq $k "kubectlImage"))) -}}{{- end -}}
{{- end -}}
{{- with $v.monitor -}}{{- $out = append $out "monitor.*: kata-monitor is not deployed (a DaemonSet); deploy it separately" -}}{{- end -}}
{{- with $v.logLevel -}}{{- $out = append $out (printf "logLevel=%v: the stages log at info (debug with debug: true)" .) -}}{{- end -}}
{{- if eq (include "kata-deploy.bool" ($v.devkit | default false)) "true" -}}{{- $out = append $out "devkit: the devkit guest extension and kata-<shim>-devkit RuntimeClasses are not installed" -}}{{- end -}}
{{- if eq (include "kata-deploy.debug" .) "true" -}}{{- $out = append $out "debug: applies to the regular RuntimeClasses; no kata-<shim>-debug RuntimeClasses are created" -}}{{- end -}}
{{- with $v.env.hostOS -}}{{- $out = append $out (printf "env.hostOS=%v: the stage reads the host itself" .) -}}{{- end -}}
{{- with $v.containerd.userDropIn -}}{{- $out = append $out "containerd.userDropIn: NOT applied; add these settings to the nodes' containerd configuration yourself" -}}{{- end -}}
{{- $setup := $v.snapshotter.setup | default list -}}
{{- if or (without $setup "nydus") $v.snapshotter.erofsMergeMode $v.snapshotter.erofsSnapshotterMode (eq (include "kata-deploy.bool" ($v.snapshotter.erofsDmverity | default false)) "true") -}}
{{- $out = append $out "snapshotter.setup erofs / snapshotter.erofs*: the stage sets up only nydus (whenever an enabled shim uses it)" -}}
{{- else if not (has "nydus" $setup) -}}
{{- $out = append $out "snapshotter.setup without nydus: the stage still sets up nydus on a node when an enabled shim uses it" -}}
{{- end -}}
{{- $enabled := include "kata-deploy.enabledShims" . | fromJsonArray -}}
{{- range $name := $enabled -}}
{{- $s := dig "containerd" "snapshotter" "" (index $v.shims $name | default dict) | toString -}}
{{- if and $s (ne $s "nydus") (ne $name "fc") -}}{{- $out = append $out (printf "shims.%s.containerd.snapshotter=%s: not configured by the stage; the shim uses containerd's default snapshotter" $name $s) -}}{{- end -}}
{{- end -}}
{{- /* fc: off by default here (values.yaml says why); upstream's values carry snapshotter: devmapper. */ -}}
{{- $fcSnap := dig "containerd" "snapshotter" "" ($v.shims.fc | default dict) | toString -}}
{{- if has "fc" $enabled -}}
{{- $out = append $out (printf "shims.fc.containerd.snapshotter%s: the devmapper snapshotter Firecracker needs is not configured by the stage; kata-fc pods start only on nodes whose containerd uses devmapper as its default snapshotter" (ternary (printf "=%s" $fcSnap) "" (ne $fcSnap ""))) -}}
{{- else if and (eq $fcSnap "devmapper") (ne (include "kata-deploy.bool" ($v.shims.disableAll | default false)) "true") -}}
{{- $out = append $out "shims.fc (upstream: on by default, snapshotter devmapper): off by default in this chart, whose stage does not configure devmapper; set shims.fc.enabled=true to install it anyway" -}}
{{- end -}}
{{- range $old, $new := include "kata-deploy.legacyShims" . | fromJson -}}
{{- if hasKey $v.shims $old -}}{{- $out = append $out (printf "shims.%s: not a shim of this chart (ignored)%s" $old (ternary (printf "; it is called %s" $new) "" (ne $new ""))) -}}{{- end -}}
{{- end -}}
{{- $aff := $v.affinity | default dict -}}
{{- if or $aff.podAffinity $aff.podAntiAffinity (dig "nodeAffinity" "preferredDuringSchedulingIgnoredDuringExecution" list $aff) -}}
{{- $out = append $out "affinity.podAffinity / podAntiAffinity / nodeAffinity.preferred*: per-node Jobs are pinned to their node by name" -}}
{{- end -}}
{{- if hasKey ($v.verification | default dict) "daemonsetTimeout" -}}{{- $out = append $out "verification.daemonsetTimeout: there is no DaemonSet rollout to wait for" -}}{{- end -}}
{{- if and (eq (include "kata-deploy.bool" $v.runtimeClasses.createDefault) "true") $v.env.multiInstallSuffix -}}
{{- $out = append $out "runtimeClasses.createDefault: the default RuntimeClass is not created with env.multiInstallSuffix (its name would clash between installs)" -}}
{{- end -}}
{{- if and (hasKey $v "nodeFeatureRules") (ne (toString (dig "create" "auto" ($v.nodeFeatureRules | default dict))) "false") -}}
{{- $out = append $out "nodeFeatureRules.create=auto: no NodeFeatureRule and no TEE key requests are created by this chart" -}}
{{- end -}}
{{- if gt (len (keys (index $v "node-feature-discovery" | default dict))) 1 -}}
{{- $out = append $out "node-feature-discovery.* (subchart values): this chart does not deploy NFD" -}}
{{- end -}}
{{- if eq (toString $v.job.dispatcherImage.reference) (include "kata-deploy.upstreamDispatcherImage" .) -}}
{{- $out = append $out (printf "job.dispatcherImage=%s (upstream's dispatcher): read as this chart's dispatcher %s" $v.job.dispatcherImage.reference (include "kata-deploy.dispatcherImage" .)) -}}
{{- end -}}
{{- if gt ($v.job.waitForNodesSeconds | default 0 | int) 0 -}}
{{- $out = append $out "job.waitForNodesSeconds: an install that selects no node fails at once (the dispatcher does not wait for nodes to appear; job.nodeSettleSeconds / job.settle waits for a selection to settle)" -}}
{{- end -}}
{{- $out | toJson -}}
{{- end -}}

{{/* Whether the stages reach systemd by entering PID 1 (hostPID + privileged), today's stage binary. */}}
{{- define "kata-deploy.systemdViaPid1" -}}
{{- include "kata-deploy.bool" (and (eq .Values.stage.restart "systemd") (ne (toString .Values.stage.systemdAccess) "dbus")) -}}
{{- end -}}


{{/* Whether the host-writing stages get precise host mounts (never with pid1: privileged). */}}
{{- define "kata-deploy.preciseMounts" -}}
{{- include "kata-deploy.bool" (and (eq (toString .Values.stage.hostMounts) "precise") (ne (include "kata-deploy.systemdViaPid1" .) "true")) -}}
{{- end -}}

{{/*
The host directories the stages write, for stage.hostMounts: precise, as a JSON map
volume name -> {path, type, stages}. stages: the stage containers that mount it writable.
*/}}
{{- define "kata-deploy.hostWrites" -}}
{{- $v := .Values -}}
{{- $prefix := include "kata-deploy.suffixed" (dict "root" . "base" (include "kata-deploy.installDir" . | trimSuffix "/")) -}}
{{- $art := list "artifacts" "prune-artifacts" "remove-artifacts" -}}
{{- $cri := list "cri" "revert-cri" -}}
{{- $out := dict
      "host-install" (dict "path" $prefix "type" "DirectoryOrCreate" "stages" $art)
      "host-state" (dict "path" (include "kata-deploy.suffixed" (dict "root" . "base" "/var/lib/kata-deploy")) "type" "DirectoryOrCreate" "stages" (concat $art $cri))
      "host-lock" (dict "path" "/run/lock" "type" "DirectoryOrCreate" "stages" (concat $art $cri)) -}}
{{- /* The nydus unit file lives under the prefix; systemd links it itself (LinkUnitFiles). */ -}}
{{- $dirs := dict
      "auto" "/etc"
      "containerd" "/etc/containerd"
      "crio" "/etc/crio"
      "k3s" "/var/lib/rancher/k3s/agent/etc/containerd"
      "k3s-agent" "/var/lib/rancher/k3s/agent/etc/containerd"
      "rke2" "/var/lib/rancher/rke2/agent/etc/containerd"
      "k0s" "/etc/k0s/containerd.d"
      "microk8s" "/var/snap/microk8s/current/args" -}}
{{- $flavour := include "kata-deploy.cri" . -}}
{{- if and (eq $flavour "auto") (eq (toString $v.k8sDistribution) "k3s") -}}{{- $flavour = "k3s" -}}{{- end -}}
{{- /* auto: the dispatcher replaces "/etc" with the node's own directory, which may not exist yet. */ -}}
{{- $cfgType := ternary "DirectoryOrCreate" "Directory" (has $flavour (list "auto" "containerd" "crio" "k0s")) -}}
{{- $_ := set $out "host-cri-config" (dict "path" (index $dirs $flavour) "type" $cfgType "stages" $cri) -}}
{{- $out | toJson -}}
{{- end -}}

{{/* Whether an enabled shim or custom runtime pulls images in the guest through nydus. */}}
{{- define "kata-deploy.usesNydus" -}}
{{- $found := false -}}
{{- range $name := include "kata-deploy.enabledShims" . | fromJsonArray -}}
{{- if eq (include "kata-deploy.stageSnapshotter" (index $.Values.shims $name)) "nydus" -}}{{- $found = true -}}{{- end -}}
{{- end -}}
{{- range $name := include "kata-deploy.enabledCustomRuntimes" . | fromJsonArray -}}
{{- if eq (include "kata-deploy.stageSnapshotter" (index $.Values.customRuntimes.runtimes $name)) "nydus" -}}{{- $found = true -}}{{- end -}}
{{- end -}}
{{- include "kata-deploy.bool" $found -}}
{{- end -}}
