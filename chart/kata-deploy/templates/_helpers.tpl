{{/*
Helpers of the kata-deploy job-mode chart. Names, labels, images, node selectors, the enabled
shims and the stage configuration are all computed here so every template agrees.
*/}}

{{/* The restricted (R) hypervisor annotations: they make the runtime use host programs or paths. */}}
{{- define "kata-deploy.restrictedAnnotations" -}}
entropy_source file_mem_backend jailer_path path vhost_user_store_path virtio_fs_daemon
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
{{- define "kata-deploy.cleanupDispatcherName" -}}{{ include "kata-deploy.base" . }}-dispatch-cleanup{{- end -}}
{{- define "kata-deploy.dispatcherServiceAccount" -}}{{ include "kata-deploy.base" . }}-dispatcher{{- end -}}
{{- define "kata-deploy.nodeServiceAccount" -}}{{ include "kata-deploy.base" . }}-node{{- end -}}
{{- define "kata-deploy.stageConfigName" -}}{{ include "kata-deploy.base" . }}-stage-config{{- end -}}
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

{{/* Images. */}}
{{- define "kata-deploy.stageImage" -}}
{{- printf "%s:%s" .Values.image.reference (.Values.image.tag | default .Chart.AppVersion) -}}
{{- end -}}
{{- define "kata-deploy.dispatcherImage" -}}
{{- printf "%s:%s" .Values.job.dispatcherImage.reference (.Values.job.dispatcherImage.tag | default .Chart.AppVersion) -}}
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

{{/* The install selector string ("" = every node). */}}
{{- define "kata-deploy.installSelector" -}}
{{- include "kata-deploy.compileSelector" (dict "eq" (.Values.job.nodeSelector | default dict) "exprs" (.Values.job.nodeSelectorExpressions | default list) "what" "job.nodeSelectorExpressions") -}}
{{- end -}}

{{/*
The cleanup selectors as a JSON list of strings; each becomes one --selector (a union).
Default (nothing configured): nodes with the kata-runtime label OR this install's claimed marker
(katacontainers.io/kata-deploy-claimed[-<suffix>], set by the stages before the host is touched).
*/}}
{{- define "kata-deploy.cleanupSelectors" -}}
{{- $c := .Values.job.cleanup | default dict -}}
{{- $sel := include "kata-deploy.compileSelector" (dict "eq" ($c.nodeSelector | default dict) "exprs" ($c.nodeSelectorExpressions | default list) "what" "job.cleanup.nodeSelectorExpressions") -}}
{{- if $sel -}}
{{- list $sel | toJson -}}
{{- else -}}
{{- $claimed := "katacontainers.io/kata-deploy-claimed" -}}
{{- with .Values.env.multiInstallSuffix -}}{{- $claimed = printf "%s-%s" $claimed . -}}{{- end -}}
{{- list "katacontainers.io/kata-runtime" $claimed | toJson -}}
{{- end -}}
{{- end -}}

{{/* Names of the enabled built-in shims, as a JSON list (sorted). */}}
{{- define "kata-deploy.enabledShims" -}}
{{- $disableAll := eq (include "kata-deploy.bool" (.Values.shims.disableAll | default false)) "true" -}}
{{- $out := list -}}
{{- range $name, $cfg := .Values.shims -}}
{{- if ne $name "disableAll" -}}
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
{{- if .root.Values.env.multiInstallSuffix -}}
{{- printf "kata-%s-%s" .name .root.Values.env.multiInstallSuffix -}}
{{- else -}}
{{- printf "kata-%s" .name -}}
{{- end -}}
{{- end -}}

{{/* Pod overhead of each built-in shim. */}}
{{- define "kata-deploy.overheads" -}}
{{- toYaml (dict
  "clh" (dict "memory" "130Mi" "cpu" "250m")
  "cloud-hypervisor" (dict "memory" "130Mi" "cpu" "250m")
  "dragonball" (dict "memory" "130Mi" "cpu" "250m")
  "fc" (dict "memory" "130Mi" "cpu" "250m")
  "qemu" (dict "memory" "320Mi" "cpu" "250m")
  "qemu-runtime-rs" (dict "memory" "320Mi" "cpu" "250m")
  "qemu-coco-dev" (dict "memory" "160Mi" "cpu" "250m")
  "qemu-coco-dev-runtime-rs" (dict "memory" "320Mi" "cpu" "250m")
  "qemu-nvidia-gpu" (dict "memory" "10240Mi" "cpu" "1")
  "qemu-nvidia-gpu-snp" (dict "memory" "10240Mi" "cpu" "1")
  "qemu-nvidia-gpu-tdx" (dict "memory" "10240Mi" "cpu" "1")
  "qemu-snp" (dict "memory" "2048Mi" "cpu" "1")
  "qemu-tdx" (dict "memory" "2048Mi" "cpu" "1")
  "qemu-se" (dict "memory" "1024Mi" "cpu" "1")
  "qemu-se-runtime-rs" (dict "memory" "1024Mi" "cpu" "1")
  "stratovirt" (dict "memory" "130Mi" "cpu" "250m")
) -}}
{{- end -}}

{{/*
The NFD node selector auto-injected for a TEE shim (empty for others), as YAML.
SEV-SNP and TDX by name; IBM SEL for -se / -se-runtime-rs. GPU shims are left to the GPU Operator.
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
{{- $upstream := index .Values "node-feature-discovery" | default dict -}}
{{- if or (eq (include "kata-deploy.bool" .Values.nfd.enabled) "true") (eq (include "kata-deploy.bool" ($upstream.enabled | default false)) "true") -}}
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

{{/* The stage configuration entry of one shim or custom runtime. Params: dict "name" "base" "cfg" "arches". */}}
{{- define "kata-deploy.stageShimEntry" -}}
{{- $cfg := .cfg | default dict -}}
{{- $ctr := $cfg.containerd | default dict -}}
{{- $crio := $cfg.crio | default dict }}
- name: {{ .name | toJson }}
  baseConfig: {{ .base | toJson }}
  supportedArches: {{ .arches | default list | toJson }}
  dropIn: {{ $cfg.dropIn | default "" | toJson }}
  allowedHypervisorAnnotations: {{ $cfg.allowedHypervisorAnnotations | default list | toJson }}
  containerdSnapshotter: {{ $ctr.snapshotter | default "" | toJson }}
  crioPullType: {{ $crio.pullType | default "" | toJson }}
{{- end -}}

{{/* The one stage configuration file (see ARCHITECTURE.md; parsed with deny_unknown_fields). */}}
{{- define "kata-deploy.stageConfig" -}}
{{- $shims := include "kata-deploy.enabledShims" . | fromJsonArray -}}
{{- $customs := include "kata-deploy.enabledCustomRuntimes" . | fromJsonArray -}}
multiInstallSuffix: {{ .Values.env.multiInstallSuffix | default "" | toJson }}
debug: {{ include "kata-deploy.bool" .Values.env.debug }}
installPrefix: {{ .Values.stage.installPrefix | toJson }}
imagePullTimeoutSeconds: {{ .Values.imagePullTimeoutSeconds | int }}
cri: {{ .Values.stage.cri | toJson }}
restart: {{ .Values.stage.restart | toJson }}
runtimeReadyTimeoutSeconds: {{ .Values.stage.runtimeReadyTimeoutSeconds | int }}
labelReadyTimeoutSeconds: {{ .Values.stage.labelReadyTimeoutSeconds | int }}
{{- if or $shims $customs }}
shims:
{{- range $name := $shims }}
{{- $cfg := index $.Values.shims $name | default dict }}
{{- include "kata-deploy.stageShimEntry" (dict "name" $name "base" $name "cfg" $cfg "arches" $cfg.supportedArches) }}
{{- end }}
{{- range $name := $customs }}
{{- $cfg := index $.Values.customRuntimes.runtimes $name | default dict }}
{{- $baseCfg := index $.Values.shims $cfg.baseConfig | default dict }}
{{- include "kata-deploy.stageShimEntry" (dict "name" $name "base" $cfg.baseConfig "cfg" $cfg "arches" ($cfg.supportedArches | default $baseCfg.supportedArches)) }}
{{- end }}
{{- else }}
shims: []
{{- end }}
{{- end -}}

{{/* Pod-level settings shared by both per-node Job templates. */}}
{{- define "kata-deploy.nodePodCommon" -}}
serviceAccountName: {{ include "kata-deploy.nodeServiceAccount" . }}
automountServiceAccountToken: true
restartPolicy: Never
{{- if eq .Values.stage.restart "systemd" }}
# The cri / revert-cri stages restart the CRI through the host's systemd (PID 1).
hostPID: true
{{- end }}
{{- with .Values.job.nodeJobs.priorityClassName }}
priorityClassName: {{ . | quote }}
{{- end }}
{{- with .Values.imagePullSecrets }}
imagePullSecrets:
{{- toYaml . | nindent 2 }}
{{- end }}
{{- with .Values.job.nodeJobs.tolerations }}
tolerations:
{{- toYaml . | nindent 2 }}
{{- end }}
volumes:
  - name: stage-config
    configMap:
      name: {{ include "kata-deploy.stageConfigName" . }}
  - name: host-root
    hostPath:
      path: /
      type: Directory
{{- end -}}

{{/*
One per-node stage container. Params: dict "root" "name" "stage" "access".
access: none (API only, non-root), read (host root read-only), write (host root read-write, root),
privileged (host root read-write, privileged: restarts the CRI).
*/}}
{{- define "kata-deploy.stageContainer" -}}
{{- $v := .root.Values -}}
- name: {{ .name }}
  image: {{ include "kata-deploy.stageImage" .root }}
  imagePullPolicy: {{ $v.imagePullPolicy }}
  args: ["--config", "/etc/kata-deploy/config.yaml", "--host-root", "/host", {{ .stage | quote }}]
  {{- with $v.job.nodeJobs.resources }}
  resources:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  volumeMounts:
    - name: stage-config
      mountPath: /etc/kata-deploy
      readOnly: true
  {{- if ne .access "none" }}
    - name: host-root
      mountPath: /host
      {{- if eq .access "read" }}
      readOnly: true
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
A dispatcher hook Job. Params: dict "root" "name" "prefix" "template" "hook" "deletePolicy"
"nodes" (list) "selectors" (list of strings) "role" (install|cleanup).
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
  annotations:
    "helm.sh/hook": {{ .hook }}
    "helm.sh/hook-weight": "0"
    "helm.sh/hook-delete-policy": {{ .deletePolicy }}
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
      {{- with $v.job.dispatcher.nodeSelector }}
      nodeSelector:
        {{- toYaml . | nindent 8 }}
      {{- end }}
      {{- with $v.job.dispatcher.tolerations }}
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
            - --owner-job
            - {{ .name }}
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
            - {{ $v.job.maxFailures | int | quote }}
            {{- with $v.job.settle }}
            - --settle
            - {{ . | quote }}
            {{- end }}
            {{- if and (eq .role "install") (eq (include "kata-deploy.bool" $v.job.requireNodes) "true") }}
            - --require-nodes
            {{- end }}
            {{- if eq .role "cleanup" }}
            # Helm never deletes hook resources on uninstall: once every node is clean, remove the
            # install dispatcher Job too (its per-node Jobs follow through their ownerReference).
            - --remove-on-success
            - {{ include "kata-deploy.installDispatcherName" .root }}
            {{- end }}
            - --log-format
            - {{ $v.job.logFormat }}
          env:
            - name: POD_NAMESPACE
              valueFrom:
                fieldRef:
                  fieldPath: metadata.namespace
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
