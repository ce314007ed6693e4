"""bench/kernel_loops.py's reading of cuobjdump output (the compile itself needs NVIDIA's wheels: not in CI)."""
from bench import kernel_loops

SASS = """
        Function : _Z8int4_mmaILi8ELi6ELi1ELi4ELi0ELi0ELb0ELb0EEvPKtPKiPK5WordsPKvS9_Ptiiiiijii
        /*0000*/                   LDC R1, c[0x0][0x28] ;
        /*0010*/                   S2R R0, SR_TID.X ;
        /*0020*/                   LDG.E.NA.128.CONSTANT R4, desc[UR6][R2.64] ;
        /*0030*/                   LOP3.LUT R8, R4, 0xf000f, R9, 0xea, !PT ;
        /*0040*/                   HMMA.16816.F32.BF16 R12, R8, R10, R12 ;
        /*0050*/               @!P0 BRA 0x20 ;
        /*0060*/                   IADD3 R5, R5, 0x1, RZ ;
        /*0070*/                   ISETP.GE.AND P1, PT, R5, 0x4, PT ;
        /*0080*/              @!P1 BRA 0x60 ;
        /*0090*/                   EXIT ;
"""


def test_the_main_loop_is_the_longest_backward_branch_with_an_mma():
    # 0x20..0x50 holds the mma; 0x60..0x80 is a loop too, without one
    loop = kernel_loops.main_loop(SASS)
    assert [kernel_loops.opcode(t) for t in loop] == ["LDG", "LOP3", "HMMA", "BRA"]
    assert kernel_loops.main_loop(SASS.replace("HMMA.16816.F32.BF16", "FFMA")) == []


def test_chunk_bytes_by_kernel_and_width():
    assert kernel_loops.chunk_bytes("int4_mma<24,2,1,4,0,0,false,false>") == 512
    assert kernel_loops.chunk_bytes("lowbit_mma<3,8,4,1,8,0,0,false>") == 768
    assert kernel_loops.chunk_bytes("lowbit_mma<8,20,0,1,4,0,0,false>") == 1024
    assert kernel_loops.chunk_bytes("lowbit_mma<5,16,2,1,1,0,3,false>") == 768   # 5-bit levels: the 6-bit layout


def test_the_default_kernels_are_each_form_the_7b_rows_launch():
    # named from packed weights by the modules' kernel_name at config_for's shapes, so they follow both
    from engine import int4_mma

    names = kernel_loops.default_names()
    assert len(set(names)) == len(names) == 12
    forms = {tuple(name.split("<")[1].rstrip(">").split(",")[4:6]) for name in names if name.startswith("int4")}
    assert forms == {(str(int4_mma.UNIFORM), str(int4_mma.HALF)), (str(int4_mma.ZEROS), str(int4_mma.HALF_BIASED)),
                     (str(int4_mma.OFFSETS), str(int4_mma.UFACTORED_HALF))}
    assert {name.split("<")[1].split(",")[0] for name in names if name.startswith("lowbit")} == {"3", "8"}
