#!/usr/bin/env bash
# A real dCache 12.0.1 for tests and benchmarks: one JVM on 127.0.0.1 with the redirecting
# HTTPS WebDAV door (2885), pools, billing to a Kafka broker, the frontend (3880/3881: SSE,
# namespace and tape APIs), macaroons and X.509. Built from source with Maven Central only.
#
#   scripts/dcache.sh build    build once into DCACHE_BASE (about 3-4 minutes on 2 cores from
#                              an empty Maven repository; later calls do nothing)
#   scripts/dcache.sh start    start it from the state it was built with (empty pools; set
#                              KEEP_STATE=1 to keep the last run's files) with billing to KAFKA
#                              (host:port, topic DCACHE_TOPIC),
#                              wait until the door and the frontend answer; prints the
#                              variables the tests read (`eval "$(scripts/dcache.sh start)"`)
#   scripts/dcache.sh stop     stop it
#   scripts/dcache.sh restart  stop and start again, files kept (the tests' restart during
#                              transfers)
#   scripts/dcache.sh env      print those variables without starting anything
#
# Environment: DCACHE_BASE (/var/tmp/dcflow-dcache: sources, build, Maven repository),
# DCACHE_SOURCES (the source archives: shared/real-dcache/src beside the clone), KAFKA,
# DCACHE_TOPIC (billing), DCACHE_POOL_SIZE (32G; the free disk caps it), DCACHE_POOL_GAP (256m:
# below it a pool is full).
#
# What the instance is (ports, users, CA): testbed/dcache/README.md.
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
BASE="${DCACHE_BASE:-/var/tmp/dcflow-dcache}"
SOURCES="${DCACHE_SOURCES:-$here/../shared/real-dcache/src}"
M2="${DCACHE_M2:-$BASE/m2}"
TOPIC="${DCACHE_TOPIC:-billing}"
T="$BASE/dcache/packages/system-test/target"
D="$T/dcache"

die() { echo "dcache.sh: $*" >&2; exit 1; }

build() {
  # A cache built before `start` began from the built state has no var.pristine: build again
  # (the steps that are done are skipped), or its pools would keep every earlier run's files.
  if [ -f "$BASE/.built" ] && [ -d "$D/var.pristine" ]; then return 0; fi
  # Maven writes colour resets to stdout even with -q -B: `start` prints only its exports there.
  build_steps >&2
}

build_steps() {
  [ -f "$SOURCES/dcache-12.0.1.tar.gz" ] || die "no dCache sources in $SOURCES (set DCACHE_SOURCES)"
  command -v mvn >/dev/null || die "Maven (mvn) is needed"
  command -v java >/dev/null || die "Java 17 is needed"
  mkdir -p "$BASE/ext" "$M2"
  cd "$BASE"
  cat > settings.xml <<XML
<settings>
  <localRepository>$M2</localRepository>
  <!-- Maven Central only: every other repository that a pom names is blocked, not tried. -->
  <mirrors><mirror><id>central-only</id><mirrorOf>*,!central</mirrorOf>
    <url>http://0.0.0.0/</url><blocked>true</blocked></mirror></mirrors>
</settings>
XML
  local mvn=(mvn -s "$BASE/settings.xml" -B -q -Dstyle.color=never -Dmaven.test.skip=true -Dmaven.javadoc.skip=true -Dgpg.skip -Dlicense.skip=true)
  local t0=$SECONDS
  # dCache's own libraries that Maven Central does not serve, from their release tags.
  [ -d ext/oncrpc4j ] || tar -xzf "$SOURCES/oncrpc4j-3.4.3.tar.gz" -C ext
  if [ ! -d ext/nfs4j ]; then
    tar -xzf "$SOURCES/nfs4j-0.27.2.tar.gz" -C ext
    # nfs4j pins oncrpc4j 3.3.0 and BerkeleyDB JE 7.3.7, neither on Central.
    sed -i '199s/3.3.0/3.4.3/; 209s/7.3.7/18.3.12/' ext/nfs4j/pom.xml
  fi
  [ -d ext/xrootd4j ] || tar -xzf "$SOURCES/xrootd4j-4.6.0.tar.gz" -C ext
  if [ ! -d ext/milton2 ]; then
    # dCache's patched milton, milton-api and milton-server-ce only (the rest is not on
    # Central and unused by dCache's WebDAV door).
    tar -xzf "$SOURCES/milton2-2.7.3.0-dcache-1.tar.gz" -C ext
    python3 - ext/milton2 <<'PY'
import re, sys
d = sys.argv[1]
p = open(d + '/pom.xml').read()
p = re.sub(r'<modules>.*?</modules>', '<modules><module>milton-api</module><module>milton-server-ce</module></modules>', p, count=1, flags=re.S)
p = p.replace('<source>1.6</source>', '<source>1.8</source>').replace('<target>1.6</target>', '<target>1.8</target>')
open(d + '/pom.xml', 'w').write(p)
f = d + '/milton-server-ce/pom.xml'; s = open(f).read()
for a in ['milton-mail-api', 'milton-mail-server', 'org.restlet', 'org.restlet.ext.fileupload']:
    s = re.sub(r'<dependency>(?:(?!</dependency>).)*?<artifactId>' + re.escape(a) + r'</artifactId>.*?</dependency>', '', s, flags=re.S)
open(f, 'w').write(s)
PY
    local j=ext/milton2/milton-server-ce/src/main/java/io/milton
    rm -rf "$j/restlet" "$j/grizzly" "$j/dns/spi" "$j/servlet/SpringMiltonFilter.java"
  fi
  (cd ext/oncrpc4j && "${mvn[@]}" install -pl oncrpc4j-core -am)
  (cd ext/nfs4j && "${mvn[@]}" install -pl core,rquota -am)
  (cd ext/xrootd4j && "${mvn[@]}" install -pl xrootd4j,xrootd4j-unix,xrootd4j-gsi,xrootd4j-ztn,xrootd4j-scitokens -am)
  (cd ext/milton2 && "${mvn[@]}" -Dmaven.source.skip=true install)
  # dCache (the patch: JE 18.3.12; no web UIs, ALICE xrootd plugin or LDAP login, whose
  # artifacts only dCache's own repository serves).
  if [ ! -d dcache ]; then
    tar -xzf "$SOURCES/dcache-12.0.1.tar.gz"
    (cd dcache && patch -p1 -s < "$here/testbed/dcache/dcache-12.0.1.patch")
  fi
  (cd dcache && mvn -s "$BASE/settings.xml" -B -q -Dstyle.color=never -T 2 -DskipTests -Dmaven.gitcommitid.skip=true \
     -am -pl packages/system-test package)
  # The instance as built, before it first runs: `start` begins from it (empty pools, the
  # test namespace as set up), so that runs do not fill the pools with earlier runs' files.
  rm -rf "$D/var.pristine" && cp -a "$D/var" "$D/var.pristine"
  touch "$BASE/.built"
  echo "dcache.sh: dCache built in $((SECONDS - t0)) s: $D" >&2
}

print_env() {
  cat <<ENV
export DCFLOW_DCACHE_DOOR=https://localhost:2885
export DCFLOW_DCACHE_FRONTEND=https://localhost:3881
export DCFLOW_DCACHE_CA=$T/ca/ca-cert.pem
export DCFLOW_DCACHE_CAPATH=$D/etc/grid-security/certificates
export DCFLOW_DCACHE_USERCERT=$D/usercert.pem
export DCFLOW_DCACHE_USERKEY=$D/userkey.pem
export DCFLOW_DCACHE_TOPIC=$TOPIC
export DCFLOW_DCACHE_LOG=$D/var/log/dCacheDomain.log
ENV
}

start() {
  [ -n "${KAFKA:-}" ] || die "KAFKA=host:port of the broker dCache publishes billing to"
  build
  if [ -z "${KEEP_STATE:-}" ]; then
    if [ -d "$D/var.pristine" ]; then
      rm -rf "$D/var" && cp -a "$D/var.pristine" "$D/var"
    else
      echo "dcache.sh: no pristine state (built before it was kept): the pools keep earlier runs' files" >&2
    fi
  fi
  local l=$D/etc/layouts/system-test.conf
  [ -f "$l.orig" ] || cp "$l" "$l.orig"
  {
    printf 'dcache.enable.kafka=true\ndcache.kafka.bootstrap-servers=%s\ndcache.kafka.topic=%s\n' "$KAFKA" "$TOPIC"
    cat "$l.orig"
    # The stock HTTPS door (2881) does not redirect; sites' doors do: one that does.
    printf '\n[dCacheDomain/webdav]\nwebdav.cell.name=WebDAV-R-${host.name}\nwebdav.net.port=2885\nwebdav.authn.protocol=https\nwebdav.authz.anonymous-operations=READONLY\nwebdav.redirect.on-read=true\nwebdav.redirect.on-write=true\n'
  } > "$l"
  # The stock pools hold 1 GiB each: too little for the large-file tests and benchmarks. Every
  # read is also copied pool to pool (pool_write -> pool_read): a run of the tests takes about
  # 4 GiB on each of the two; 32G leaves room for several runs (KEEP_STATE, restart).
  # A pool counts itself full once `free + removable - size <= gap`, free being capped by the
  # file system's usable space, and the gap defaults to min(4 GiB, size / 4): with 8G pools a
  # disk with less than 2 GiB free made every PUT a 507 "All pools are full". A 256 MiB gap.
  sed -i -e "s/^set max diskspace .*/set max diskspace ${DCACHE_POOL_SIZE:-32G}/" -e '/^set gap /d' \
    -e "s/^set max diskspace .*/&\nset gap ${DCACHE_POOL_GAP:-256m}/" "$D"/var/pools/*/setup
  local free_mib
  free_mib=$(df -Pm "$D/var/pools" | awk 'NR==2 {print $4}')
  echo "dcache.sh: ${free_mib} MiB free for the pools ($D/var/pools)" >&2
  if [ "${free_mib:-0}" -lt 4096 ]; then
    echo "dcache.sh: warning: less than 4 GiB free under $D/var/pools; the large-file tests need about 4 GiB" >&2
  fi
  "$D/bin/dcache" check-config >/dev/null
  "$T/bin/ctlcluster" start >&2
  local i
  for i in $(seq 240); do
    if (exec 3<>/dev/tcp/127.0.0.1/2885) 2>/dev/null && (exec 3<>/dev/tcp/127.0.0.1/3881) 2>/dev/null \
       && curl -sf -o /dev/null --cacert "$T/ca/ca-cert.pem" -u admin:dickerelch -X PROPFIND -H 'Depth: 0' https://localhost:2885/public/; then
      echo "dcache.sh: dCache answers after about $i s (log: $D/var/log/dCacheDomain.log)" >&2
      print_env
      return 0
    fi
    sleep 1
  done
  die "dCache did not answer within 240 s; see $D/var/log/dCacheDomain.log"
}

stop() {
  [ -x "$T/bin/ctlcluster" ] || return 0
  "$T/bin/ctlcluster" stop >&2 || true
}

case "${1:-}" in
  build) build ;;
  start) start ;;
  stop) stop ;;
  restart) stop; KEEP_STATE=1 start >/dev/null ;;
  env) print_env ;;
  *) die "usage: scripts/dcache.sh build|start|stop|restart|env" ;;
esac
