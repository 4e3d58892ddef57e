#!/bin/sh
# In-guest: ordinary tools on the virtiofs mount, compared with tmpfs.
#
#   sh tools.sh [REF_DIR [TARGET_DIR]]      (defaults /tmp/tools-ref, /mnt/tools)
#
# Every step runs the same commands with X=REF_DIR and then X=TARGET_DIR,
# capturing the exit status and a normalized output (paths relative to X).
# A step passes when both exit 0 and the outputs are identical. Prints one
# line per step:  TOOLS {"step": ..., "status": "pass"|"FAIL", "ref_rc": N, "target_rc": N}
# then          TOOLS {"summary": true, "passed": N, "failed": N, "failed_steps": [...]}
# and exits 1 if any step failed. A failing step's outputs are shown (diff).
#
# Steps: cp -a of a tree (docs, symlinks, hard links, a fifo, a sparse file,
# odd modes) then diff -r and a find listing of types/modes/sizes/times;
# tar c then tar x and diff; find | sort; a python script (os.walk,
# shutil.copytree, sqlite3); fio psync write/randwrite/read with crc32c verify.

REF=${1:-/tmp/tools-ref}
TGT=${2:-/mnt/tools}
WORK=/tmp/tools-work
SRC=$WORK/src
export LC_ALL=C
umask 022

rm -rf "$REF" "$TGT" "$WORK"
mkdir -p "$REF" "$TGT" "$WORK" || exit 2

# ---- the source tree (on tmpfs) ----
mkdir -p "$SRC"
cp -a /usr/share/doc/p* "$SRC/" 2>/dev/null
mkdir -p "$SRC/extra/deep/er/still"
printf 'hello\n' > "$SRC/extra/hello.txt"
ln "$SRC/extra/hello.txt" "$SRC/extra/hardlink.txt"
ln -s ../hello.txt "$SRC/extra/deep/rel-link"
ln -s /nonexistent/target "$SRC/extra/dangling"
mkfifo "$SRC/extra/fifo"
dd if=/dev/zero of="$SRC/extra/sparse" bs=1 count=1 seek=3000000 2>/dev/null
printf 'x' > "$SRC/extra/mode-4711"; chmod 4711 "$SRC/extra/mode-4711"
printf 'y' > "$SRC/extra/mode-0600"; chmod 0600 "$SRC/extra/mode-0600"
chmod 1777 "$SRC/extra/deep"
printf 'owned\n' > "$SRC/extra/owned-by-4321"; chown 4321:8765 "$SRC/extra/owned-by-4321"
touch -h -d '2001-02-03 04:05:06' "$SRC/extra/deep/rel-link"
touch -d '1999-12-31 23:59:59.123456789' "$SRC/extra/hello.txt"
python3 -c "import os; os.makedirs('$SRC/extra/many', exist_ok=True); [open('$SRC/extra/many/f%04d' % i, 'w').write(str(i) * (i % 50)) for i in range(600)]"

cat > "$WORK/script.py" <<'EOF'
import hashlib, os, shutil, sqlite3, sys
x = sys.argv[1]
os.makedirs(f"{x}/py/a/b", exist_ok=True)
for i in range(50):
    with open(f"{x}/py/a/b/f{i}", "w") as f:
        f.write("line %d\n" % i * (i + 1))
shutil.copytree(f"{x}/py/a", f"{x}/py/copy", symlinks=True)
walk = []
for root, dirs, files in os.walk(f"{x}/py"):
    dirs.sort()
    for n in sorted(files):
        p = os.path.join(root, n)
        walk.append((os.path.relpath(p, x), os.path.getsize(p),
                     hashlib.md5(open(p, "rb").read()).hexdigest()[:8]))
print(len(walk), walk[:3], walk[-3:])
db = sqlite3.connect(f"{x}/py/test.db")
db.execute("create table t (id integer primary key, v text)")
with db:
    db.executemany("insert into t (v) values (?)", [("v%d" % i,) for i in range(2000)])
with db:
    db.execute("update t set v = v || '!' where id % 3 = 0")
print(db.execute("select count(*), sum(length(v)) from t").fetchone())
db.execute("vacuum")
db.close()
db = sqlite3.connect(f"{x}/py/test.db")
print(db.execute("pragma integrity_check").fetchone(), db.execute("select v from t where id = 300").fetchone())
db.close()
os.rename(f"{x}/py/copy", f"{x}/py/moved")
shutil.rmtree(f"{x}/py/a")
print(sorted(os.listdir(f"{x}/py")))
EOF

# ---- steps ----
# types, modes, sizes (not of directories: file system specific), link
# counts, owners, symlink targets and mtimes of everything below "."
listing() {
    find . -mindepth 1 -type d -printf '%p %y %m %n %U:%G %T@\n' | sort
    find . -mindepth 1 ! -type d -printf '%p %y %m %s %n %U:%G %l %T@\n' | sort
}
step_cp_a() {
    cp -a "$SRC" "$X/tree" || return 1
    diff -r --no-dereference -x fifo "$SRC" "$X/tree" || return 1
    cd "$X/tree" && listing
}
step_tar() {
    tar -C "$X" -cf "$X/tree.tar" tree || return 1
    mkdir "$X/untar" && tar -C "$X/untar" -xpf "$X/tree.tar" || return 1
    diff -r --no-dereference -x fifo "$X/tree" "$X/untar/tree" || return 1
    tar -tvf "$X/tree.tar" | awk '{print $2, $6}' | sort
    cd "$X/untar" && listing
}
step_find_sort() {
    cd "$X" && find . \( -name tree.tar \) -prune -o -print | sort
}
step_python() {
    python3 "$WORK/script.py" "$X"
}
FIO="fio --ioengine=psync --size=32M --verify=crc32c --do_verify=1 --output=/dev/null"
step_fio_seq() {
    $FIO --name=seq --filename="$X/fio.seq" --rw=write --bs=1M --end_fsync=1 || return 1
    fio --name=seqread --ioengine=psync --filename="$X/fio.seq" --rw=read --bs=256k --size=32M --output=/dev/null || return 1
    stat -c '%s' "$X/fio.seq"
}
step_fio_rand() {
    $FIO --name=rand --filename="$X/fio.rand" --rw=randwrite --bs=4k --randseed=1234 || return 1
    stat -c '%s' "$X/fio.rand"
}
step_rm_rf() {
    rm -rf "$X/tree" "$X/untar" || return 1
    cd "$X" && find . | sort
}

passed=0
failed=0
failed_steps=""
run() {
    name=$1
    for side in ref tgt; do
        if [ $side = ref ]; then X=$REF; else X=$TGT; fi
        start=$(date +%s%N)
        ( cd "$X" && "step_$name" ) > "$WORK/$name.$side.out" 2> "$WORK/$name.$side.err"
        rc=$?
        end=$(date +%s%N)
        eval "${side}_rc=$rc"
        eval "${side}_ms=$(( (end - start) / 1000000 ))"
        sed -i "s#$X#<X>#g" "$WORK/$name.$side.out"
    done
    if [ "$ref_rc" = 0 ] && [ "$tgt_rc" = 0 ] && cmp -s "$WORK/$name.ref.out" "$WORK/$name.tgt.out"; then
        status=pass; passed=$((passed + 1))
    else
        status=FAIL; failed=$((failed + 1))
        failed_steps="$failed_steps${failed_steps:+, }\"$name\""
    fi
    echo "TOOLS {\"step\": \"$name\", \"status\": \"$status\", \"ref_rc\": $ref_rc, \"target_rc\": $tgt_rc, \"ms\": $tgt_ms, \"ref_ms\": $ref_ms}"
    if [ $status = FAIL ]; then
        echo "--- $name: stderr (target)"; tail -n 20 "$WORK/$name.tgt.err"
        echo "--- $name: stderr (ref)"; tail -n 5 "$WORK/$name.ref.err"
        echo "--- $name: diff ref target"; diff "$WORK/$name.ref.out" "$WORK/$name.tgt.out" | head -n 40
    fi
}

run cp_a
run tar
run find_sort
run python
run fio_seq
run fio_rand
run rm_rf

echo "TOOLS {\"summary\": true, \"passed\": $passed, \"failed\": $failed, \"failed_steps\": [$failed_steps]}"
[ "$failed" = 0 ]
