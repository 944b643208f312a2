#!/usr/bin/env bash
# Create a Cloud TPU VM (single host or multi-host slice) with gcloud and start the TuFT-JAX
# server on it. Run with --help for usage; --dry-run prints every command and runs nothing.
#
# Remote commands are built as strings in single quotes on purpose ("$HOME", "$py" must expand
# on the VM, not here), and '~' is kept literal so that it means the VM's home directory:
# shellcheck disable=SC2016,SC2088
set -euo pipefail

PROG=$(basename "$0")
REPO_ROOT=$(cd "$(dirname "$0")/.." && pwd)

usage() {
    cat <<EOF
Usage: $PROG --name NAME --zone ZONE --accelerator-type TYPE [options] [-- TUFT_ARGS...]

Create a Cloud TPU VM (or multi-host TPU slice) with gcloud, copy this package to every
worker, install it with 'jax[tpu]' in a venv, and start the tuft server on every worker
(process 0 serves HTTP; on a multi-host slice the other workers join it through
jax.distributed with --coordinator-address/--num-processes/--process-id).

Required:
  --name NAME               TPU VM name: lowercase letters, digits and '-', starting with a
                            letter, not ending with '-', at most 63 characters
  --zone ZONE               zone with capacity for the accelerator, e.g. us-central2-b,
                            us-west4-a, europe-west4-a
  --accelerator-type TYPE   e.g. v5litepod-8 (1 host), v4-8 (1 host), v4-32 (4 hosts),
                            v5p-16 (2 hosts), v6e-16 (4 hosts)

Options:
  --version VERSION         TPU software (runtime) version. Default from the type:
                              v6e -> v2-alpha-tpuv6e, v5p -> v2-alpha-tpuv5,
                              v5litepod -> v2-alpha-tpuv5-lite, v2/v3/v4 -> tpu-ubuntu2204-base
  --project PROJECT         GCP project (default: gcloud's configured core/project)
  --spot                    create a Spot TPU (cheaper, can be preempted at any time)
  --skip-create             reuse an existing TPU VM called NAME (redeploy: copy, install,
                            restart tuft)
  --source-dir DIR          git checkout to deploy (default: this repository). Its HEAD commit
                            is packed with 'git archive' and scp'ed to every worker;
                            uncommitted changes are NOT deployed
  --repo-url URL            instead of copying a local checkout, 'git clone' URL on every worker
  --ref REF                 with --repo-url: branch or tag to clone (default: the default branch)
  --model-config FILE       local models.yaml, copied to ~/tuft/models.yaml on every worker.
                            Model paths inside it are resolved ON THE VM (relative paths against
                            ~/tuft/). Without it the server serves only its built-in tiny model
  --port PORT               HTTP port of the server on worker 0 (default 8080)
  --checkpoint-dir DIR      checkpoint directory on the VM (default ~/tuft/checkpoints). For a
                            bucket, mount it with gcsfuse on every worker first and pass the
                            mount point (a multi-host slice needs storage all workers share)
  --cache-dir DIR           passed to tuft --cache-dir (a directory on the VM)
  --num-hosts N             number of TPU VM hosts (workers); only needed for an accelerator type
                            this script does not know
  --coordinator-port PORT   jax.distributed coordinator port on worker 0 (default 8476)
  --python PYTHON           Python (>= 3.11) on the VM used to create the venv (default: the
                            first of python3.13/3.12/3.11/python3 that is >= 3.11, else
                            python3.11 is installed with apt)
  --tunnel                  bind the server to 127.0.0.1 on worker 0 and print an SSH port
                            forward (ssh -L) instead of a public URL: the safer choice, as the
                            server accepts any API key
  --dry-run                 print every command (gcloud, git) and run nothing; gcloud need not
                            be installed. Values only known at run time (IP addresses) are shown
                            as <placeholders>
  -h, --help                show this help and exit
  -- TUFT_ARGS...           everything after '--' is passed to tuft on every worker

On the VM: source in ~/tuft/src, venv in ~/tuft/venv, logs in ~/tuft/logs/tuft-<worker>.log,
the server's pid in ~/tuft/tuft.pid (a redeploy stops that process first).

Without --tunnel the URL printed at the end is http://<worker 0 external IP>:PORT, which
needs a VPC firewall rule allowing tcp:PORT (the command to create one is printed).

Examples:
  $PROG --name tuft-v5e --zone us-west4-a --accelerator-type v5litepod-8 \\
      --model-config models/models.yaml --tunnel
  $PROG --name tuft-v4 --zone us-central2-b --accelerator-type v4-32 --spot --dry-run
EOF
}

die() {  # usage error
    printf '%s: error: %s\n' "$PROG" "$*" >&2
    printf "Run '%s --help' for usage.\n" "$PROG" >&2
    exit 2
}

fail() {  # runtime error
    printf '%s: error: %s\n' "$PROG" "$*" >&2
    exit 1
}

# Quote one word for a POSIX shell: safe words as is, anything else in single quotes.
shquote() {
    local s=$1
    if [[ -n $s && $s =~ ^[A-Za-z0-9_./:=@%+,-]+$ ]]; then
        printf '%s' "$s"
    else
        printf "'%s'" "${s//\'/\'\\\'\'}"
    fi
}

# Quote one word for the remote shell: safe words as is, anything else in double quotes (so
# that the whole remote command, single-quoted when printed, stays readable).
rquote() {
    local s=$1
    if [[ -n $s && $s =~ ^[A-Za-z0-9_./:=@%+,-]+$ ]]; then
        printf '%s' "$s"
    else
        s=${s//\\/\\\\}
        s=${s//\"/\\\"}
        s=${s//\$/\\\$}
        s=${s//\`/\\\`}
        printf '"%s"' "$s"
    fi
}

# Quote a path for the remote shell, expanding a leading '~' to the remote $HOME.
remote_path() {
    local p=$1
    if [[ $p == "~" ]]; then
        printf '"$HOME"'
    elif [[ $p == "~/"* ]]; then
        printf '"$HOME"/'
        [[ -z ${p#\~/} ]] || rquote "${p#\~/}"
    else
        rquote "$p"
    fi
}

join_quoted() {  # for the local shell
    local out="" word
    for word in "$@"; do
        out+="${out:+ }$(shquote "$word")"
    done
    printf '%s' "$out"
}

join_rquoted() {  # for the remote shell
    local out="" word
    for word in "$@"; do
        out+="${out:+ }$(rquote "$word")"
    done
    printf '%s' "$out"
}

# ---------------------------------------------------------------------------------------------
# Arguments
name="" zone="" accel="" version="" project="" spot=0 skip_create=0
source_dir="" repo_url="" ref="" model_config="" port=8080
checkpoint_dir="~/tuft/checkpoints" cache_dir="" num_hosts="" coordinator_port=8476
python_bin="" tunnel=0 dry_run=0
tuft_args=()

while [[ $# -gt 0 ]]; do
    arg=$1
    shift
    if [[ $arg == --*=* ]]; then  # --flag=value
        set -- "${arg#*=}" "$@"
        arg=${arg%%=*}
        inline_value=1
    else
        inline_value=0
    fi
    case $arg in
        -h | --help) usage; exit 0 ;;
        --spot | --skip-create | --tunnel | --dry-run)
            [[ $inline_value == 0 ]] || die "$arg takes no value"
            case $arg in
                --spot) spot=1 ;;
                --skip-create) skip_create=1 ;;
                --tunnel) tunnel=1 ;;
                --dry-run) dry_run=1 ;;
            esac
            ;;
        --name | --zone | --accelerator-type | --version | --project | --source-dir | --repo-url | \
            --ref | --model-config | --port | --checkpoint-dir | --cache-dir | --num-hosts | \
            --coordinator-port | --python)
            [[ $# -gt 0 ]] || die "$arg needs a value"
            value=$1
            shift
            if [[ $inline_value == 0 && $value == --* ]]; then
                die "$arg needs a value (got option '$value')"
            fi
            [[ -n $value ]] || die "$arg must not be empty"
            [[ $value != *$'\n'* ]] || die "$arg must not contain a newline"
            case $arg in
                --name) name=$value ;;
                --zone) zone=$value ;;
                --accelerator-type) accel=$value ;;
                --version) version=$value ;;
                --project) project=$value ;;
                --source-dir) source_dir=$value ;;
                --repo-url) repo_url=$value ;;
                --ref) ref=$value ;;
                --model-config) model_config=$value ;;
                --port) port=$value ;;
                --checkpoint-dir) checkpoint_dir=$value ;;
                --cache-dir) cache_dir=$value ;;
                --num-hosts) num_hosts=$value ;;
                --coordinator-port) coordinator_port=$value ;;
                --python) python_bin=$value ;;
            esac
            ;;
        --) tuft_args=("$@"); break ;;
        *) die "unknown argument '$arg'" ;;
    esac
done

# ---------------------------------------------------------------------------------------------
# Validation
[[ -n $name ]] || die "--name is required"
[[ -n $zone ]] || die "--zone is required"
[[ -n $accel ]] || die "--accelerator-type is required"

[[ $name =~ ^[a-z]([-a-z0-9]{0,61}[a-z0-9])?$ ]] ||
    die "invalid --name '$name': use lowercase letters, digits and '-', start with a letter, do not end with '-', at most 63 characters"
[[ $zone =~ ^[a-z]+-[a-z]+[0-9]+-[a-z]$ ]] ||
    die "invalid --zone '$zone' (expected something like us-central2-b)"
[[ $accel =~ ^([a-z0-9]+)-([0-9]{1,5})$ ]] ||
    die "invalid --accelerator-type '$accel' (expected FAMILY-SIZE, e.g. v5litepod-8 or v4-32)"
family=${BASH_REMATCH[1]}
size=$((10#${BASH_REMATCH[2]}))
[[ $size -gt 0 ]] || die "invalid --accelerator-type '$accel': size must be positive"
if [[ -n $project ]]; then
    [[ $project =~ ^([a-z0-9.-]+:)?[a-z][-a-z0-9]{4,28}[a-z0-9]$ ]] ||
        die "invalid --project '$project' (6-30 lowercase letters, digits or '-', starting with a letter)"
fi

check_port() {  # FLAG VALUE
    if ! [[ $2 =~ ^[0-9]{1,5}$ ]] || ((10#$2 < 1 || 10#$2 > 65535)); then
        die "invalid $1 '$2': must be an integer from 1 to 65535"
    fi
}
check_port --port "$port"
check_port --coordinator-port "$coordinator_port"
port=$((10#$port))
coordinator_port=$((10#$coordinator_port))

if [[ -n $num_hosts ]]; then
    if ! [[ $num_hosts =~ ^[0-9]{1,4}$ ]] || ((10#$num_hosts < 1)); then
        die "invalid --num-hosts '$num_hosts': must be a positive integer"
    fi
    num_hosts=$((10#$num_hosts))
fi

# Hosts (TPU VM workers) per accelerator type. v2/v3/v4/v5p sizes count TensorCores (2 per chip,
# 4 chips per host); v5litepod/v6e sizes count chips (up to 8 chips on one host; larger slices
# are built from 4-chip hosts).
default_version="" expected_hosts=""
case $family in
    v2 | v3 | v4 | v5p)
        ((size % 8 == 0)) || die "invalid --accelerator-type '$accel': $family sizes are multiples of 8 (TensorCores)"
        expected_hosts=$((size / 8))
        case $family in
            v5p) default_version=v2-alpha-tpuv5 ;;
            *) default_version="tpu-ubuntu2204-base" ;;
        esac
        ;;
    v5litepod | v6e)
        if ((size <= 8)); then
            expected_hosts=1
        else
            ((size % 4 == 0)) || die "invalid --accelerator-type '$accel': multi-host $family sizes are multiples of 4 chips"
            expected_hosts=$((size / 4))
        fi
        case $family in
            v6e) default_version=v2-alpha-tpuv6e ;;
            *) default_version=v2-alpha-tpuv5-lite ;;
        esac
        ;;
esac
if [[ -z $num_hosts ]]; then
    [[ -n $expected_hosts ]] ||
        die "unknown accelerator family '$family' in '$accel': pass --num-hosts N (and --version)"
    num_hosts=$expected_hosts
fi
if [[ -z $version ]]; then
    [[ -n $default_version ]] || die "no default TPU software version for '$accel': pass --version"
    version=$default_version
fi
[[ $version =~ ^[a-z0-9][-a-z0-9._]*$ ]] || die "invalid --version '$version'"
if ((num_hosts > 1)) && [[ $port == "$coordinator_port" ]]; then
    die "--port and --coordinator-port must differ on a multi-host slice (both $port)"
fi

if [[ -n $repo_url && -n $source_dir ]]; then
    die "--repo-url and --source-dir are mutually exclusive"
fi
if [[ -n $ref && -z $repo_url ]]; then
    die "--ref only applies with --repo-url"
fi
if [[ -n $repo_url ]]; then
    [[ $repo_url =~ ^[^[:space:]]+$ ]] || die "invalid --repo-url '$repo_url': must not contain whitespace"
    [[ $repo_url != -* ]] || die "invalid --repo-url '$repo_url'"
    if [[ -n $ref ]]; then
        [[ $ref =~ ^[A-Za-z0-9][A-Za-z0-9._/-]*$ ]] || die "invalid --ref '$ref'"
    fi
else
    source_dir=${source_dir:-$REPO_ROOT}
    [[ -d $source_dir ]] || die "--source-dir '$source_dir' is not a directory"
    source_dir=$(cd "$source_dir" && pwd)
fi
if [[ -n $model_config ]]; then
    [[ -f $model_config && -r $model_config ]] || die "--model-config '$model_config' is not a readable file"
fi
if [[ -n $python_bin ]]; then
    [[ $python_bin =~ ^[A-Za-z0-9_./-]+$ ]] || die "invalid --python '$python_bin'"
fi
for word in "${tuft_args[@]+"${tuft_args[@]}"}"; do
    [[ $word != *$'\n'* ]] || die "arguments after '--' must not contain a newline"
done

if [[ $dry_run == 0 ]]; then
    command -v gcloud >/dev/null 2>&1 ||
        fail "gcloud not found on PATH: install the Google Cloud CLI (https://cloud.google.com/sdk/docs/install) and run 'gcloud auth login', or use --dry-run to only print the commands"
    if [[ -z $repo_url ]]; then
        command -v git >/dev/null 2>&1 || fail "git not found on PATH (needed to pack --source-dir)"
        git -C "$source_dir" rev-parse --verify --quiet HEAD >/dev/null ||
            fail "--source-dir '$source_dir' is not a git checkout with a commit (needed for 'git archive HEAD')"
        if [[ -n $(git -C "$source_dir" status --porcelain) ]]; then
            printf '%s: warning: %s has uncommitted changes or untracked files; only its HEAD commit is deployed\n' \
                "$PROG" "$source_dir" >&2
        fi
    fi
fi

# ---------------------------------------------------------------------------------------------
# Running (or printing) commands
say() {  # a note: '# ...' on stdout in a dry run, on stderr otherwise
    if [[ $dry_run == 1 ]]; then
        printf '# %s\n' "$*"
    else
        printf '%s: %s\n' "$PROG" "$*" >&2
    fi
}

run() {
    if [[ $dry_run == 1 ]]; then
        printf '%s\n' "$(join_quoted "$@")"
    else
        printf '+ %s\n' "$(join_quoted "$@")" >&2
        "$@"
    fi
}

# query VAR PLACEHOLDER CMD...: set VAR to the command's output (to PLACEHOLDER in a dry run)
query() {
    local __var=$1 __placeholder=$2 __out
    shift 2
    if [[ $dry_run == 1 ]]; then
        printf '%s\n' "$(join_quoted "$@")"
        printf -v "$__var" '%s' "$__placeholder"
    else
        printf '+ %s\n' "$(join_quoted "$@")" >&2
        __out=$("$@")
        printf -v "$__var" '%s' "$__out"
    fi
}

# Print stdin as is, or as '# ' comments in a dry run (so its output stays a shell script).
report() {
    if [[ $dry_run == 1 ]]; then
        sed 's/^/# /'
    else
        cat
    fi
}

gcloud_flags=("--zone=$zone")
[[ -z $project ]] || gcloud_flags+=("--project=$project")
tpu=(gcloud compute tpus tpu-vm)

ssh_workers() {  # WORKER REMOTE_COMMAND
    run "${tpu[@]}" ssh "$name" "${gcloud_flags[@]}" "--worker=$1" --command "$2"
}

remote_root='"$HOME"/tuft'
steps=5
multi=0
((num_hosts == 1)) || multi=1

say "TPU VM '$name': $accel in $zone, software version $version, $num_hosts host(s)"

# 1. Create the TPU VM.
if [[ $skip_create == 0 ]]; then
    say "[1/$steps] create the TPU VM"
    create=("${tpu[@]}" create "$name" "${gcloud_flags[@]}" "--accelerator-type=$accel" "--version=$version")
    [[ $spot == 0 ]] || create+=(--spot)
    run "${create[@]}"
else
    say "[1/$steps] --skip-create: reusing the existing TPU VM"
fi
if [[ $multi == 1 ]]; then
    say "note: commands on --worker=all need your gcloud SSH key in ssh-agent: ssh-add ~/.ssh/google_compute_engine"
fi

# 2. Copy the source (and the model config) to every worker.
say "[2/$steps] copy the source to every worker"
setup="set -eu; mkdir -p $remote_root"
if [[ -n $repo_url ]]; then
    clone=(git clone --depth 1)
    [[ -z $ref ]] || clone+=(--branch "$ref")
    clone+=(-- "$repo_url")
    setup+="; rm -rf $remote_root/src; $(join_rquoted "${clone[@]}") $remote_root/src"
else
    if [[ $dry_run == 1 ]]; then
        work="${TMPDIR:-/tmp}/tuft-deploy-$name"
    else
        work=$(mktemp -d "${TMPDIR:-/tmp}/tuft-deploy.XXXXXX")
        trap 'rm -rf -- "$work"' EXIT
    fi
    tarball="$work/tuft-src.tar.gz"
    run git -C "$source_dir" archive --format=tar.gz -o "$tarball" HEAD
    run "${tpu[@]}" scp "$tarball" "$name:tuft-src.tar.gz" "${gcloud_flags[@]}" --worker=all
    setup+="; rm -rf $remote_root/src; mkdir -p $remote_root/src"
    setup+="; tar -xzf \"\$HOME\"/tuft-src.tar.gz -C $remote_root/src; rm -f \"\$HOME\"/tuft-src.tar.gz"
fi
if [[ -n $model_config ]]; then
    run "${tpu[@]}" scp "$model_config" "$name:tuft-models.yaml" "${gcloud_flags[@]}" --worker=all
    setup+="; mv -f \"\$HOME\"/tuft-models.yaml $remote_root/models.yaml"
fi
ssh_workers all "$setup"

# 3. Install the package with JAX for TPU into a venv on every worker.
say "[3/$steps] install 'jax[tpu]' and the package into ~/tuft/venv on every worker"
if [[ -n $python_bin ]]; then
    pick_python="py=$(rquote "$python_bin")"
else
    pick_python='py=; for c in python3.13 python3.12 python3.11 python3; do'
    pick_python+=' if command -v "$c" >/dev/null 2>&1 && "$c" -c "import sys; sys.exit(sys.version_info < (3, 11))"; then py=$c; break; fi; done'
    pick_python+='; if [ -z "$py" ]; then sudo apt-get update -q && sudo DEBIAN_FRONTEND=noninteractive apt-get install -y -q python3.11 python3.11-venv && py=python3.11; fi'
fi
install="set -eu; $pick_python; cd $remote_root"
install+='; if [ ! -x venv/bin/python ]; then "$py" -m venv venv; fi'
install+="; venv/bin/python -m pip install --quiet --upgrade pip"
install+='; venv/bin/python -m pip install "jax[tpu]" -e ./src'
ssh_workers all "$install"

# 4. Start tuft on every worker.
say "[4/$steps] start tuft on every worker ($num_hosts process(es))"
describe=("${tpu[@]}" describe "$name" "${gcloud_flags[@]}")
coordinator="" coordinator_ip="" external_ip=""
if [[ $multi == 1 ]]; then
    say "worker 0's internal IP is the jax.distributed coordinator:"
    query coordinator_ip '<worker0-internal-ip>' "${describe[@]}" '--format=value(networkEndpoints[0].ipAddress)'
    if [[ $dry_run == 0 ]]; then
        [[ $coordinator_ip =~ ^[0-9a-fA-F.:]+$ ]] ||
            fail "could not read worker 0's internal IP from 'gcloud ... describe' (got '$coordinator_ip')"
    fi
    coordinator="$coordinator_ip:$coordinator_port"
fi

bind_host=0.0.0.0
[[ $tunnel == 0 ]] || bind_host=127.0.0.1
for ((i = 0; i < num_hosts; i++)); do
    tuft_line="$remote_root/venv/bin/tuft --host $bind_host --port $port --checkpoint-dir $(remote_path "$checkpoint_dir")"
    if [[ -n $model_config ]]; then
        tuft_line+=" --model-config $remote_root/models.yaml"
    fi
    if [[ -n $cache_dir ]]; then
        tuft_line+=" --cache-dir $(remote_path "$cache_dir")"
    fi
    if [[ $multi == 1 ]]; then
        tuft_line+=" $(join_rquoted --coordinator-address "$coordinator" --num-processes "$num_hosts" --process-id "$i")"
    fi
    if [[ ${#tuft_args[@]} -gt 0 ]]; then
        tuft_line+=" $(join_rquoted "${tuft_args[@]}")"
    fi
    start="set -eu; cd $remote_root; mkdir -p logs $(remote_path "$checkpoint_dir")"
    # Stop the server a previous deploy started (by the pid it recorded), waiting up to 30 s.
    start+='; if [ -f tuft.pid ] && kill -0 "$(cat tuft.pid)" 2>/dev/null; then kill "$(cat tuft.pid)";'
    start+=' for _ in $(seq 30); do kill -0 "$(cat tuft.pid)" 2>/dev/null || break; sleep 1; done; fi'
    start+="; nohup $tuft_line > logs/tuft-$i.log 2>&1 < /dev/null &"
    start+=' echo $! > tuft.pid'
    start+="; echo \"worker $i: tuft started (pid \$(cat tuft.pid)), log ~/tuft/logs/tuft-$i.log\""
    ssh_workers "$i" "$start"
done

# 5. Where to reach it.
say "[5/$steps] connect"
ssh_base=("${tpu[@]}" ssh "$name" "${gcloud_flags[@]}" --worker=0)
tunnel_cmd="$(join_quoted "${ssh_base[@]}" -- -N -L "$port:localhost:$port")"
logs_cmd="$(join_quoted "${ssh_base[@]}" --command "tail -n 100 -f ~/tuft/logs/tuft-0.log")"
health_cmd="curl -fsS http://127.0.0.1:$port/healthz"
if [[ $tunnel == 1 ]]; then
    url="http://localhost:$port"
    {
        echo
        echo "tuft listens on 127.0.0.1:$port on worker 0. Forward the port (leave it running):"
        echo "  $tunnel_cmd"
        echo "then point the Tinker SDK at:"
        echo "  URL: $url"
    } | report
else
    say "worker 0's external IP:"
    query external_ip '<worker0-external-ip>' "${describe[@]}" '--format=value(networkEndpoints[0].accessConfig.externalIp)'
    if [[ -z $external_ip ]]; then
        external_ip='<worker0-external-ip>'
        printf '%s: warning: worker 0 has no external IP; use the SSH tunnel below\n' "$PROG" >&2
    fi
    url="http://$external_ip:$port"
    firewall=(gcloud compute firewall-rules create "allow-tuft-$port" --network=default
        "--allow=tcp:$port" --source-ranges=YOUR_IP/32)
    [[ -z $project ]] || firewall+=("--project=$project")
    {
        echo
        echo "The server needs a VPC firewall rule allowing tcp:$port to reach it, e.g.:"
        echo "  $(join_quoted "${firewall[@]}")"
        echo "(restrict --source-ranges to your own address: the server accepts any API key)."
        echo "Safer: redeploy with --tunnel (binds 127.0.0.1), or forward the port over SSH:"
        echo "  $tunnel_cmd   # then use http://localhost:$port"
        echo "  URL: $url"
    } | report
fi
{
    echo "Logs: $logs_cmd"
    echo "Health check (on worker 0): $health_cmd"
    echo "The first start downloads and compiles for a while; the server is up once /healthz answers."
} | report
