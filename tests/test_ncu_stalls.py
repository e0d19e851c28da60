"""benchmarks/ncu_stalls.py, which turns Nsight Compute's CSV pages into the few lines of a GPU
check's log that say where a kernel's warps wait: on CSV shaped like ncu's, and on CSV it does not
know (then it shows what came, rather than nothing)."""

import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "benchmarks", "ncu_stalls.py")


def stalls(mode, text):
    proc = subprocess.run([sys.executable, SCRIPT, mode], input=text, capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout.splitlines()


RAW = ('"ID","Kernel Name","smsp__average_warps_issue_stalled_barrier_per_issue_active.ratio",'
       '"smsp__average_warps_issue_stalled_long_scoreboard_per_issue_active.ratio",'
       '"smsp__average_warps_issue_stalled_wait_per_issue_active.ratio","sm__cycles_elapsed.avg"\n'
       '"","","ratio","ratio","ratio","cycle"\n'
       '"0","liif_query_wgmma_mc_kernel","0.5","2,125.5","0","462378"\n')


def test_raw_page_gives_the_stall_reasons_largest_first_without_zeros():
    lines = stalls("raw", RAW)
    assert [x.split()[1] for x in lines] == [
        "smsp__average_warps_issue_stalled_long_scoreboard_per_issue_active.ratio",
        "smsp__average_warps_issue_stalled_barrier_per_issue_active.ratio"]
    assert float(lines[0].split()[0]) == 2125.5


SOURCE = ('"# Address","Source","Warp Stall Sampling (All Samples)",'
          '"Warp Stall Sampling (Not-issued Samples)"\n'
          '"0x0010","HGMMA.64x256x16.F32.BF16 R24, gdesc[UR4], R24","1,500","1,400"\n'
          '"0x0020","SYNCS.PHASECHK.TRANS64 P0, [R2+URZ], R3","500","480"\n'
          '"0x0030","IMAD.MOV.U32 R0, RZ, RZ, R1","0","0"\n')


def test_source_page_gives_the_places_with_the_most_samples_and_their_share():
    lines = stalls("source", SOURCE)
    assert lines[0].strip() == "2000 samples in all"
    assert lines[1].split()[:2] == ["75.0%", "0x0010"] and "HGMMA" in lines[1]
    assert lines[2].split()[:2] == ["25.0%", "0x0020"] and "SYNCS" in lines[2]
    assert len(lines) == 3  # no line without samples


def test_unknown_csv_is_shown_as_it_came():
    for mode in ("raw", "source"):
        lines = stalls(mode, '"a","b"\n"1","2"\n')
        assert lines[0].startswith("(no ") and lines[1].strip() == '"a","b"'.replace('"', "")


def test_empty_input_and_a_bad_mode():
    assert stalls("source", "") == ["(ncu printed nothing)"]
    proc = subprocess.run([sys.executable, SCRIPT, "details"], input="", capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode != 0 and "usage" in proc.stderr
