#!/bin/sh
# /init of qmpnet's test guest (busybox sh). It reports on the serial console what a
# host-side test must see, one "QMPNET <EVENT> key=value ..." line per event:
#   QMPNET READY                      modules loaded, lo up; the NIC watcher starts now
#   QMPNET IPERF ready                iperf3 -s listens on port 5201
#   QMPNET NIC-ADD name= mac= rxq= txq= msix= mtu=   mtu: as the driver set it (host_mtu)
#   QMPNET NIC-ADDR name= addr=       169.254.B.2/24 set and link up (B = last MAC byte)
#   QMPNET PING name= peer= result=ok|fail    peer 169.254.B.1, the host end
#   QMPNET NIC-DEL name= mac=
#   QMPNET CARRIER name= mac= state=up|down   the NIC's carrier, first seen and on each change
#   QMPNET DONE seq= rc=              a command from the host's channel ran (see below)
# Commands come on the second serial port (ttyS1, the host's command socket), one per line:
# "DO SEQ MAC ARGS..." runs "ip ARGS..." with the word "{dev}" replaced by the name of the NIC
# that has MAC (as plugged: /run/nic), so a test can change the guest's own view of its NIC
# (its MAC, its addresses and multicast groups) and see what QEMU and the host make of it.
# MACs are printed as the kernel does, in lower case. There is no udev: NICs are found by
# polling /sys/class/net, every 50 ms. A NIC is known by its ifindex, not its name: when a NIC
# goes and the next one registers under the same name between two looks, the first one's
# NIC-DEL and the second one's NIC-ADD are both printed. A NIC that comes and goes within one
# look's interval is never seen: a test that needs the guest's markers waits for NIC-ADD
# before it unplugs.

/bin/busybox --install -s
export PATH=/bin:/sbin:/usr/bin:/usr/sbin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
exec </dev/null >/dev/console 2>&1

say() { echo "QMPNET $*"; }

# count GLOB-EXPANSION: how many paths the glob matched (an unmatched glob stays literal).
count() { if [ -e "$1" ]; then echo $#; else echo 0; fi; }

# still NAME IFINDEX: whether NAME is still the NIC that had IFINDEX (not gone, not replaced).
still() {
    local now=""
    { read -r now <"/sys/class/net/$1/ifindex"; } 2>/dev/null
    [ -n "$now" ] && [ "$now" = "$2" ]
}

# settled_queues NAME IFINDEX: the queue directories are rebuilt right after the netdev
# registers: wait until both counts are non-zero and the same in three reads ~10 ms apart (at
# most 500 reads); stop at once when the NIC is gone, so that the loop can report it.
settled_queues() {
    local now="0 0" last="" same=0 tries=0
    while [ $tries -lt 500 ] && still "$1" "$2"; do
        now="$(count /sys/class/net/$1/queues/rx-*) $(count /sys/class/net/$1/queues/tx-*)"
        case "$now" in
            0\ * | *\ 0) same=0 ;;
            "$last") same=$((same + 1)); [ $same -ge 2 ] && break ;;
            *) same=0 ;;
        esac
        last=$now tries=$((tries + 1))
        usleep 10000
    done
    echo "$now"
}

ping_peer() {
    local i=0 result=fail
    while [ $i -lt 20 ]; do
        if ping -c 1 -W 1 "$2" >/dev/null 2>&1; then result=ok; break; fi
        i=$((i + 1))
        usleep 500000
    done
    say "PING name=$1 peer=$2 result=$result"
}

# /run/nic/NAME holds "MAC IFINDEX" of the NIC seen under NAME.
nic_added() {
    local n=$1 mac="" idx="" queues msix mtu b
    { read -r mac <"/sys/class/net/$n/address" && read -r idx <"/sys/class/net/$n/ifindex"; } \
        2>/dev/null
    case "$mac" in
        ??:??:??:??:??:??) ;;
        *) return ;;  # gone again before it could be read: init must not die on it
    esac
    [ -n "$idx" ] || return
    echo "$mac $idx" >/run/nic/$n
    queues=$(settled_queues $n $idx)
    # device is the virtio device; its parent is the PCI function that owns the vectors.
    msix=$(count /sys/class/net/$n/device/../msi_irqs/*)
    mtu=""
    { read -r mtu <"/sys/class/net/$n/mtu"; } 2>/dev/null
    say "NIC-ADD name=$n mac=$mac rxq=${queues% *} txq=${queues#* } msix=$msix mtu=$mtu"
    still $n $idx || return  # gone (or replaced) already: the loop reports it
    b=$((0x${mac##*:}))
    if ip addr add 169.254.$b.2/24 dev $n && ip link set $n up; then
        say "NIC-ADDR name=$n addr=169.254.$b.2"
        ping_peer $n 169.254.$b.1 &
    else
        say "ERROR addr name=$n"
    fi
}

# carrier NAME MACFILE: say CARRIER when the NIC's carrier is first readable (its link is up)
# and whenever it changes; shell built-ins only, as this runs every 50 ms for every NIC.
carrier() {
    local now was="" mac
    read -r now 2>/dev/null <"/sys/class/net/$1/carrier" || return
    [ -e "/run/carrier/$1" ] && read -r was <"/run/carrier/$1"
    [ "$now" = "$was" ] && return
    echo "$now" >"/run/carrier/$1"
    read -r mac _ <"$2"
    if [ "$now" = 1 ]; then say "CARRIER name=$1 mac=$mac state=up"; else say "CARRIER name=$1 mac=$mac state=down"; fi
}

# guest.py numbers the modules in dependency order, so the glob's order is the right one.
for m in /lib/modules/*.ko; do
    insmod "$m" || say "ERROR insmod $m"
done
ip link set lo up
# an address a test adds is usable at once (no duplicate detection to wait out)
echo 0 >/proc/sys/net/ipv6/conf/default/accept_dad 2>/dev/null
mkdir -p /run/nic /run/carrier
say READY

if [ -x /usr/bin/iperf3 ]; then
    if iperf3 -s -D; then
        # -D returns before the server listens: wait for port 5201 (0x1451) in LISTEN (0A).
        i=0
        until grep -q ':1451 [0-9A-F]*:0000 0A ' /proc/net/tcp6 /proc/net/tcp; do
            i=$((i + 1))
            [ $i -gt 200 ] && break
            usleep 50000
        done
        if [ $i -gt 200 ]; then say "IPERF fail"; else say "IPERF ready"; fi
    else
        say "IPERF fail"
    fi
fi

# the NIC (its name) plugged with MAC $1, from /run/nic
nic_named() {
    local f mac idx
    for f in /run/nic/*; do
        [ -e "$f" ] || continue
        read -r mac idx <"$f"
        [ "$mac" = "$1" ] && { echo "${f##*/}"; return; }
    done
}

commands() {
    local tag seq mac dev args
    stty -F /dev/ttyS1 -echo 2>/dev/null
    while read -r tag seq mac args; do
        [ "$tag" = DO ] || continue
        dev=$(nic_named "$mac")
        # shellcheck disable=SC2086 # the words are the command's own
        ip $(echo "$args" | sed "s/{dev}/${dev:-none}/g") >/dev/null 2>&1
        say "DONE seq=$seq rc=$?"
    done </dev/ttyS1
}
[ -e /dev/ttyS1 ] && commands &

nic_gone() {
    local mac idx
    read -r mac idx <"/run/nic/$1"
    say "NIC-DEL name=$1 mac=$mac"
    rm -f "/run/nic/$1" "/run/carrier/$1"
}

while :; do
    for f in /run/nic/*; do
        n=${f##*/}
        if [ -e "$f" ]; then
            read -r mac idx <"$f"
            if still "$n" "$idx"; then carrier "$n" "$f"; else nic_gone "$n"; fi
        fi
    done
    for d in /sys/class/net/*; do
        n=${d##*/}
        [ "$n" = lo ] || [ -e /run/nic/$n ] || nic_added "$n"
    done
    usleep 50000
done
