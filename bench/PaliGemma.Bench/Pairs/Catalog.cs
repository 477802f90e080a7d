using PaliGemma.CpuOnly.Tensors;

namespace PaliGemma.Bench.Pairs;

/// <summary>The compared kernel calls at PaliGemma 3B-224's shapes (SigLIP So400m/14 and Gemma 2B), by name.</summary>
internal static class Catalog
{
    private const int Tokens = 256;     // 224 / 14 = 16 x 16 image tokens; also a short prefill

    public static readonly string[] MatMul =
    [
        "gemm.siglip.fc1.1152x4304.f32", "gemm.siglip.fc1.1152x4304.bf16",
        "gemm.siglip.fc2.4304x1152.f32", "gemm.siglip.fc2.4304x1152.bf16",
        "gemm.gemma.kv.2048x256.bf16", "gemm.gemma.q.2048x2048.f32", "gemm.gemma.q.2048x2048.bf16",
        "gemm.gemma.up.2048x16384.bf16", "gemm.gemma.down.16384x2048.f32", "gemm.gemma.down.16384x2048.bf16",
        "gemv.gemma.kv.2048x256.bf16", "gemv.gemma.q.2048x2048.bf16", "gemv.gemma.up.2048x16384.f32",
        "gemv.gemma.up.2048x16384.bf16", "gemv.gemma.down.16384x2048.bf16", "gemv.gemma.lmhead.2048x257216.bf16",
    ];

    public static readonly string[] Attention =
    [
        "attn.siglip.16x72.s256", "attn.siglip.16x72.s1024", "attn.siglip.16x72.s4096",
        "attn.gemma.8x256.mqa.s256", "attn.gemma.8x256.mqa.s1024", "attn.gemma.8x256.mqa.s4096",
        "attn.gemma.8x256.mqa.decode.k1024", "attn.gemma.8x256.mqa.decode.k4096",
    ];

    public static readonly string[] Norm =
    [
        "norm.siglip.layernorm.256x1152", "norm.gemma.rmsnorm.256x2048", "norm.gemma.rmsnorm.1x2048",
    ];

    public static IEnumerable<string> All => MatMul.Concat(Attention).Concat(Norm);

    /// <summary>Builds (and checks) the pair a catalogue name describes.</summary>
    public static KernelPair Create(string name)
    {
        string[] parts = name.Split('.');
        switch (parts[0])
        {
            case "gemm":
            case "gemv":
            {
                string[] kn = parts[3].Split('x');
                DType dtype = parts[4] == "bf16" ? DType.BF16 : DType.F32;
                return new MatMulPair(name, parts[0] == "gemm" ? Tokens : 1, int.Parse(kn[0]), int.Parse(kn[1]), dtype);
            }
            case "attn":
            {
                string[] hd = parts[2].Split('x');
                int heads = int.Parse(hd[0]), dim = int.Parse(hd[1]);
                int kvHeads = parts[3] == "mqa" ? 1 : heads;
                string last = parts[^1];
                int keys = int.Parse(last[1..]);
                int queries = parts.Contains("decode") ? 1 : keys;
                return new AttentionPair(name, queries, keys, heads, kvHeads, dim);
            }
            case "norm":
            {
                string[] rd = parts[3].Split('x');
                return new NormPair(name, int.Parse(rd[0]), int.Parse(rd[1]), parts[2] == "rmsnorm");
            }
            default:
                throw new ArgumentException($"unknown comparison '{name}'", nameof(name));
        }
    }
}
