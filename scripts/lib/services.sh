# Shared by scripts/test and scripts/bench: make sure the backing services answer on
# loopback, starting (and on Debian as root, installing) what is missing.

port_open() {
  (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null
}

wait_port() { # port seconds name
  local port=$1 seconds=$2 name=$3
  for _ in $(seq "$((seconds * 4))"); do
    port_open "$port" && return 0
    sleep 0.25
  done
  echo "error: $name did not come up on 127.0.0.1:$port within ${seconds}s" >&2
  return 1
}

can_install() {
  [ -f /etc/debian_version ] && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null
}

APT_UPDATED=0
apt_install() { # package...
  local missing=()
  for package in "$@"; do
    dpkg -s "$package" >/dev/null 2>&1 || missing+=("$package")
  done
  [ ${#missing[@]} -eq 0 ] && return 0
  if [ "$APT_UPDATED" = 0 ]; then
    apt-get update -qq
    APT_UPDATED=1
  fi
  echo "== installing ${missing[*]}"
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
}

# ensure NAME PORT PACKAGE HINT START-FUNCTION
ensure() {
  local name=$1 port=$2 package=$3 hint=$4 start=$5
  port_open "$port" && return 0
  if ! can_install; then
    echo "error: $name is not answering on 127.0.0.1:$port. Start it first: $hint" >&2
    exit 1
  fi
  apt_install $package
  echo "== starting $name on 127.0.0.1:$port"
  "$start"
  wait_port "$port" 90 "$name"
}

start_postgres() {
  local version
  version=$(ls /etc/postgresql | sort -V | tail -n 1)
  pg_ctlcluster --skip-systemctl-redirect "$version" main start
}

start_redis() {
  redis-server --daemonize yes --bind 127.0.0.1 --port 6379 --save "" --appendonly no \
    --logfile /tmp/keel-redis.log
}

start_rabbitmq() {
  RABBITMQ_NODE_IP_ADDRESS=127.0.0.1 rabbitmq-server -detached
}

start_etcd() {
  local dir=/tmp/keel-etcd
  mkdir -p "$dir"
  setsid nohup etcd --name keel-test --data-dir "$dir/data" \
    --listen-client-urls http://127.0.0.1:2379 --advertise-client-urls http://127.0.0.1:2379 \
    --listen-peer-urls http://127.0.0.1:2380 --initial-advertise-peer-urls http://127.0.0.1:2380 \
    --initial-cluster keel-test=http://127.0.0.1:2380 \
    >"$dir/etcd.log" 2>&1 </dev/null &
}

# tansu: a Kafka-protocol broker from crates.io, kept in memory (nothing on disk, as the
# tests want). Built once with cargo install (a few minutes) when it is not on PATH.
TANSU_VERSION=0.6.0
start_tansu() {
  local dir=/tmp/keel-tansu
  mkdir -p "$dir"
  setsid nohup tansu broker --listener-url tcp://127.0.0.1:9092 \
    --advertised-listener-url tcp://127.0.0.1:9092 --storage-engine memory://tansu/ \
    >"$dir/tansu.log" 2>&1 </dev/null &
}

ensure_kafka() {
  port_open 9092 && return 0
  export PATH="$HOME/.cargo/bin:$PATH"
  if ! command -v tansu >/dev/null; then
    echo "== installing tansu $TANSU_VERSION (cargo install, once)"
    cargo install tansu --locked --version "$TANSU_VERSION" --features dynostore
  fi
  echo "== starting tansu (Kafka) on 127.0.0.1:9092"
  start_tansu
  wait_port 9092 60 "tansu (Kafka)"
}

ensure_services() {
  ensure PostgreSQL 5432 "postgresql" \
    "install PostgreSQL and run it on 127.0.0.1:5432 with trust auth for user postgres" start_postgres
  ensure Redis 6379 "redis-server" \
    "redis-server --port 6379 --bind 127.0.0.1" start_redis
  ensure RabbitMQ 5672 "rabbitmq-server" \
    "rabbitmq-server (guest/guest on 127.0.0.1:5672)" start_rabbitmq
  ensure etcd 2379 "etcd-server" \
    "etcd --listen-client-urls http://127.0.0.1:2379 --advertise-client-urls http://127.0.0.1:2379" start_etcd
  ensure_kafka
  # The etcd client's build script runs protoc, which needs Google's well-known types
  # (descriptor.proto, struct.proto) beside it; Debian ships those in libprotobuf-dev.
  if ! command -v protoc >/dev/null || ! [ -f /usr/include/google/protobuf/descriptor.proto ]; then
    if can_install; then
      apt_install protobuf-compiler libprotobuf-dev
    elif ! command -v protoc >/dev/null; then
      echo "error: protoc is missing; install the protobuf compiler (Debian: protobuf-compiler libprotobuf-dev)" >&2
      exit 1
    fi
  fi
}
