namespace PaliGemma.CpuOnly.Model.Imaging;

/// <summary>
/// The "islow" integer inverse DCT that libjpeg(-turbo) uses by default (JDCT_ISLOW): the Loeffler-Ligtenberg-Moschytz
/// factorisation in 13-bit fixed point, with 2 extra bits kept between the column and row passes. All arithmetic is
/// integer, so any arrangement of the same products and sums rounds identically; only the two descaling shifts round.
/// </summary>
internal static class JpegIdct
{
    private const int ConstBits = 13;
    private const int Pass1Bits = 2;

    // Cosine multipliers scaled by 2^13 and rounded, as in libjpeg.
    private const int Fix0_298631336 = 2446;
    private const int Fix0_390180644 = 3196;
    private const int Fix0_541196100 = 4433;
    private const int Fix0_765366865 = 6270;
    private const int Fix0_899976223 = 7373;
    private const int Fix1_175875602 = 9633;
    private const int Fix1_501321110 = 12299;
    private const int Fix1_847759065 = 15137;
    private const int Fix1_961570560 = 16069;
    private const int Fix2_053119869 = 16819;
    private const int Fix2_562915447 = 20995;
    private const int Fix3_072711026 = 25172;

    /// <summary>
    /// libjpeg's post-IDCT range limit: the result (centred on 0) is masked to 10 bits, then values -128..127 map to
    /// 0..255, larger ones to 255 and smaller ones to 0. Corrupt data can exceed that range and wraps as in libjpeg.
    /// </summary>
    private static readonly byte[] s_rangeLimit = BuildRangeLimit();

    /// <summary>Dequantises one block (natural order) and writes its 8x8 samples.</summary>
    public static void Transform(ReadOnlySpan<short> coefficients, ReadOnlySpan<int> quantization, Span<byte> output, int stride)
    {
        Span<int> workspace = stackalloc int[64];

        // Pass 1: columns, keeping Pass1Bits extra fraction bits.
        for (int column = 0; column < 8; column++)
        {
            if (coefficients[8 + column] == 0 && coefficients[16 + column] == 0 && coefficients[24 + column] == 0
                && coefficients[32 + column] == 0 && coefficients[40 + column] == 0 && coefficients[48 + column] == 0
                && coefficients[56 + column] == 0)
            {
                // Only the DC term: the column is constant (the general path gives the same value).
                int dc = coefficients[column] * quantization[column] << Pass1Bits;
                for (int row = 0; row < 8; row++)
                {
                    workspace[row * 8 + column] = dc;
                }

                continue;
            }

            Butterfly(
                coefficients[column] * quantization[column],
                coefficients[8 + column] * quantization[8 + column],
                coefficients[16 + column] * quantization[16 + column],
                coefficients[24 + column] * quantization[24 + column],
                coefficients[32 + column] * quantization[32 + column],
                coefficients[40 + column] * quantization[40 + column],
                coefficients[48 + column] * quantization[48 + column],
                coefficients[56 + column] * quantization[56 + column],
                ConstBits - Pass1Bits,
                out int o0, out int o1, out int o2, out int o3, out int o4, out int o5, out int o6, out int o7);
            workspace[column] = o0;
            workspace[8 + column] = o1;
            workspace[16 + column] = o2;
            workspace[24 + column] = o3;
            workspace[32 + column] = o4;
            workspace[40 + column] = o5;
            workspace[48 + column] = o6;
            workspace[56 + column] = o7;
        }

        // Pass 2: rows, removing the extra bits and the factor 8 of the 2-D transform.
        const int finalShift = ConstBits + Pass1Bits + 3;
        for (int row = 0; row < 8; row++)
        {
            ReadOnlySpan<int> w = workspace.Slice(row * 8, 8);
            Span<byte> line = output.Slice(row * stride, 8);
            Butterfly(w[0], w[1], w[2], w[3], w[4], w[5], w[6], w[7], finalShift,
                out int o0, out int o1, out int o2, out int o3, out int o4, out int o5, out int o6, out int o7);
            line[0] = RangeLimit(o0);
            line[1] = RangeLimit(o1);
            line[2] = RangeLimit(o2);
            line[3] = RangeLimit(o3);
            line[4] = RangeLimit(o4);
            line[5] = RangeLimit(o5);
            line[6] = RangeLimit(o6);
            line[7] = RangeLimit(o7);
        }
    }

    /// <summary>One 8-point LLM inverse DCT; the even inputs scale by 2^13 and the result is shifted right, rounding.</summary>
    private static void Butterfly(int x0, int x1, int x2, int x3, int x4, int x5, int x6, int x7, int shift,
        out int o0, out int o1, out int o2, out int o3, out int o4, out int o5, out int o6, out int o7)
    {
        // Even part.
        int z1 = (x2 + x6) * Fix0_541196100;
        int even2 = z1 - x6 * Fix1_847759065;
        int even3 = z1 + x2 * Fix0_765366865;
        int even0 = (x0 + x4) << ConstBits;
        int even1 = (x0 - x4) << ConstBits;
        int t10 = even0 + even3;
        int t13 = even0 - even3;
        int t11 = even1 + even2;
        int t12 = even1 - even2;

        // Odd part.
        int sum73 = x7 + x1;
        int sum53 = x5 + x3;
        int sum77 = x7 + x3;
        int sum51 = x5 + x1;
        int z5 = (sum77 + sum51) * Fix1_175875602;
        int odd0 = x7 * Fix0_298631336;
        int odd1 = x5 * Fix2_053119869;
        int odd2 = x3 * Fix3_072711026;
        int odd3 = x1 * Fix1_501321110;
        int za = sum73 * -Fix0_899976223;
        int zb = sum53 * -Fix2_562915447;
        int zc = sum77 * -Fix1_961570560 + z5;
        int zd = sum51 * -Fix0_390180644 + z5;
        odd0 += za + zc;
        odd1 += zb + zd;
        odd2 += zb + zc;
        odd3 += za + zd;

        int rounding = 1 << (shift - 1);
        o0 = (t10 + odd3 + rounding) >> shift;
        o7 = (t10 - odd3 + rounding) >> shift;
        o1 = (t11 + odd2 + rounding) >> shift;
        o6 = (t11 - odd2 + rounding) >> shift;
        o2 = (t12 + odd1 + rounding) >> shift;
        o5 = (t12 - odd1 + rounding) >> shift;
        o3 = (t13 + odd0 + rounding) >> shift;
        o4 = (t13 - odd0 + rounding) >> shift;
    }

    private static byte RangeLimit(int value) => s_rangeLimit[value & 1023];

    private static byte[] BuildRangeLimit()
    {
        var table = new byte[1024];
        for (int i = 0; i < table.Length; i++)
        {
            int centred = i < 512 ? i : i - 1024; // the masked value read as a signed 10-bit number
            table[i] = (byte)Math.Clamp(centred + 128, 0, 255);
        }

        return table;
    }
}
