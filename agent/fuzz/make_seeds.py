# Writes the seed corpus of the fuzz targets (run from agent/fuzz: python3 make_seeds.py).
import json, os
def varint(n):
    out=b''
    while True:
        b=n&0x7f; n>>=7
        if n: out+=bytes([b|0x80])
        else: return out+bytes([b])
def f_len(num, data):
    if isinstance(data,str): data=data.encode()
    return varint(num<<3|2)+varint(len(data))+data
def f_var(num, n): return varint(num<<3|0)+varint(n)
def storage(driver, source, fstype, options, mp, ro=False):
    b=f_var(1,driver)+f_len(2,source)+f_len(3,fstype)
    for o in options: b+=f_len(4,o)
    b+=f_len(5,mp)
    if ro: b+=f_var(6,1)
    return b
SPEC={"ociVersion":"1.0.2","root":{"path":"rootfs","readonly":True},
 "process":{"args":["/bin/sh","-c","echo hi"],"cwd":"/","env":["PATH=/bin"],"user":{"uid":0,"gid":0},
   "noNewPrivileges":False,"capabilities":{"bounding":["CAP_KILL"],"effective":["CAP_KILL"],"permitted":["CAP_KILL"]},
   "rlimits":[{"type":"RLIMIT_NOFILE","hard":1024,"soft":1024}]},
 "hostname":"c1",
 "mounts":[{"destination":"/proc","type":"proc","source":"proc"},{"destination":"/tmp","type":"tmpfs","source":"tmpfs","options":["nosuid","size=65536k"]}],
 "linux":{"namespaces":[{"type":"pid"},{"type":"mount"},{"type":"ipc"},{"type":"uts"}],
   "resources":{"memory":{"limit":67108864},"cpu":{"shares":512},"pids":{"limit":64}},
   "maskedPaths":["/proc/kcore"],"readonlyPaths":["/proc/sys"],
   "seccomp":{"defaultAction":"SCMP_ACT_ALLOW","syscalls":[{"names":["mkdir"],"action":"SCMP_ACT_ERRNO","errnoRet":1}]}}}
MIN={"ociVersion":"1.0.2","process":{"args":["true"],"cwd":"/","user":{"uid":0,"gid":0}},"linux":{}}
PROC={"args":["ls","-l"],"cwd":"/","env":["A=b"],"user":{"uid":1000,"gid":1000,"additionalGids":[5]},"noNewPrivileges":True}
def w(target,name,data):
    open(f"corpus/{target}/{name}","wb").write(data)
spec=json.dumps(SPEC,separators=(',',':')).encode()
w("oci_spec","full-spec.json",spec)
w("oci_spec","minimal-spec.json",json.dumps(MIN).encode())
w("oci_spec","exec-process.json",json.dumps(PROC).encode())
w("oci_spec","terminal-process.json",json.dumps({"args":["sh"],"cwd":"/","terminal":True,"user":{"uid":0,"gid":0}}).encode())
# request_decode: selector byte, then body (selectors as in agent/src/fuzzing.rs REQUESTS).
stdio=f_var(1,1)+f_var(2,1)+f_var(3,1)
cc=f_len(1,"c1")+f_len(2,spec)+f_len(3,"/run/crx/storage/c1/rootfs")+f_len(4,storage(1,"share0","virtiofs",["ro","nodev"],"c1/rootfs"))+f_len(5,stdio)
w("request_decode","create-container.bin",bytes([8])+cc)
ex=f_len(1,"c1")+f_len(2,"e1")+f_len(3,json.dumps(PROC).encode())+f_len(4,stdio)
w("request_decode","exec-process.bin",bytes([10])+ex)
ms=f_len(1,storage(2,"vol-1","ext4",["noatime","data=ordered","errors=remount-ro"],"pods/p1/vol",True))+f_var(2,2000)
w("request_decode","mount-storage-block.bin",bytes([3])+ms)
w("request_decode","mount-storage-bind.bin",bytes([3])+f_len(1,storage(3,"/etc/hosts","",["ro","nosuid"],"b/hosts")))
w("request_decode","mount-storage-tmpfs.bin",bytes([3])+f_len(1,storage(4,"","tmpfs",["size=1m","mode=0755"],"t")))
dns=f_len(1,"10.0.0.2")+f_len(2,"svc.cluster.local")+f_len(3,"ndots:5")
iface=f_len(1,"eth0")+f_len(2,"02:00:00:00:00:01")+f_var(3,1500)+f_len(4,f_len(1,"10.0.0.5")+f_var(2,24))+f_len(4,f_len(1,"fd00::5")+f_var(2,64))
route=f_len(1,"0.0.0.0/0")+f_len(2,"10.0.0.1")+f_len(3,"eth0")+f_var(5,100)
sysctl=f_len(1,"net.ipv4.ip_forward")+f_len(2,"1")
cs=f_len(1,"pod-1")+f_len(2,"web")+f_len(3,dns)+f_len(4,iface)+f_len(5,route)+f_len(6,sysctl)+f_len(7,storage(4,"","",[],"shm"))+f_len(8,json.dumps({"memory":{"limit":268435456}}).encode())+f_var(9,1)
w("request_decode","create-sandbox.bin",bytes([6])+cs)
w("request_decode","destroy-sandbox.bin",bytes([7])+f_var(1,5000))
w("request_decode","signal-process.bin",bytes([11])+f_len(1,"c1")+f_len(2,"e1")+f_var(3,15)+f_var(4,1))
env=f_len(1,"crx.agent.v1.Containers")+f_len(2,"ExecProcess")+f_len(3,ex)+f_var(4,10**9)+f_len(5,f_len(1,"k")+f_len(2,"v"))
w("request_decode","envelope-exec-process.bin",bytes([22])+env)
# stream_header: magic, big-endian length, StreamHeader.
def hdr(cid,eid,kind):
    b=f_len(1,cid)+f_len(2,eid)+f_var(3,kind)
    return b"CRXS"+len(b).to_bytes(2,"big")+b
w("stream_header","stdout-init.bin",hdr("c1","",2))
w("stream_header","stdin-exec.bin",hdr("c1","e1",1))
w("stream_header","tty.bin",hdr("c1","",4))
w("stream_header","bad-magic.bin",b"CRXX\x00\x01\x00")
