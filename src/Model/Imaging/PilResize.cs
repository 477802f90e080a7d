using System.Numerics;
using System.Runtime.InteropServices;

namespace PaliGemma.CpuOnly.Model.Imaging;

/// <summary>
/// Pillow's <c>Image.resize(size, Image.BICUBIC)</c> for 8-bit RGB, reproduced bit for bit.
/// </summary>
/// <remarks>
/// Pillow resamples separably: a horizontal pass into an 8-bit intermediate image, then a vertical pass. Each output
/// sample is a weighted sum of the input samples under a Keys cubic kernel (a = -0.5), widened by the scale factor when
/// shrinking so that it also low-pass filters. The weights are computed in double precision per output position,
/// normalised to sum to one, then converted to fixed point with 22 fractional bits; the sums are integers, rounded by a
/// half-unit start value and clamped to 0..255. Integer sums do not depend on the order of the additions, so the loops
/// here may be vectorised freely without leaving Pillow's results.
/// </remarks>
public static class PilResize
{
    /// <summary>Fractional bits of the fixed-point weights: 32 bits less 8 for the sample and 2 of headroom for overshoot.</summary>
    private const int PrecisionBits = 32 - 8 - 2;

    /// <summary>Half a unit in the last fixed-point place: the start value of every sum, so the final shift rounds.</summary>
    private const int RoundingBias = 1 << (PrecisionBits - 1);

    /// <summary>Radius of the bicubic kernel in input pixels at scale 1.</summary>
    private const double BicubicSupport = 2.0;

    private const int Channels = 3;

    /// <summary>Resizes <paramref name="source"/> to <paramref name="width"/> x <paramref name="height"/> as PIL's bicubic filter does.</summary>
    /// <exception cref="ArgumentOutOfRangeException">A target dimension is not positive.</exception>
    public static RgbImage Bicubic(RgbImage source, int width, int height)
    {
        ArgumentNullException.ThrowIfNull(source);
        ArgumentOutOfRangeException.ThrowIfNegativeOrZero(width);
        ArgumentOutOfRangeException.ThrowIfNegativeOrZero(height);

        bool needHorizontal = width != source.Width;
        bool needVertical = height != source.Height;
        if (!needHorizontal && !needVertical)
        {
            // Pillow returns a copy when the size does not change.
            return new RgbImage(width, height, (byte[])source.Pixels.Clone());
        }

        // Pillow sizes the intermediate image to the rows the vertical pass reads; without a vertical pass that is every row.
        ResampleCoefficients? vertical = needVertical ? ResampleCoefficients.ForBicubic(source.Height, height) : null;
        int firstRow = vertical?.FirstInputIndex ?? 0;
        int rowCount = vertical is null ? source.Height : vertical.LastInputIndexExclusive - firstRow;

        byte[] horizontalOutput;
        if (needHorizontal)
        {
            var horizontal = ResampleCoefficients.ForBicubic(source.Width, width);
            horizontalOutput = new byte[checked(width * rowCount * Channels)];
            ResampleHorizontal(source.Pixels, source.Width, firstRow, rowCount, horizontalOutput, horizontal);
            if (vertical is null)
            {
                return new RgbImage(width, height, horizontalOutput);
            }
        }
        else
        {
            horizontalOutput = source.Pixels;
            firstRow = 0; // the vertical pass reads the source itself
        }

        var output = new byte[checked(width * height * Channels)];
        ResampleVertical(horizontalOutput, width, firstRow, output, vertical!);
        return new RgbImage(width, height, output);
    }

    /// <summary>Resamples rows [<paramref name="firstRow"/>, firstRow + rowCount) of an RGB image along x.</summary>
    private static void ResampleHorizontal(
        ReadOnlySpan<byte> input, int inputWidth, int firstRow, int rowCount, Span<byte> output, ResampleCoefficients coefficients)
    {
        int inputStride = inputWidth * Channels;
        int outputWidth = coefficients.OutputSize;
        int outputStride = outputWidth * Channels;
        for (int row = 0; row < rowCount; row++)
        {
            ReadOnlySpan<byte> inputRow = input.Slice((firstRow + row) * inputStride, inputStride);
            Span<byte> outputRow = output.Slice(row * outputStride, outputStride);
            for (int x = 0; x < outputWidth; x++)
            {
                ReadOnlySpan<int> weights = coefficients.Weights(x);
                ReadOnlySpan<byte> taps = inputRow.Slice(coefficients.Start(x) * Channels, weights.Length * Channels);
                int red = RoundingBias, green = RoundingBias, blue = RoundingBias;
                for (int i = 0; i < weights.Length; i++)
                {
                    int weight = weights[i];
                    red += taps[i * Channels] * weight;
                    green += taps[i * Channels + 1] * weight;
                    blue += taps[i * Channels + 2] * weight;
                }

                outputRow[x * Channels] = Clip8(red);
                outputRow[x * Channels + 1] = Clip8(green);
                outputRow[x * Channels + 2] = Clip8(blue);
            }
        }
    }

    /// <summary>
    /// Resamples along y. <paramref name="input"/> holds consecutive rows of <paramref name="width"/> pixels starting at
    /// source row <paramref name="inputFirstRow"/>.
    /// </summary>
    private static void ResampleVertical(
        ReadOnlySpan<byte> input, int width, int inputFirstRow, Span<byte> output, ResampleCoefficients coefficients)
    {
        int stride = width * Channels;
        // Every channel of a row is an independent sum with the same weights, so whole rows are accumulated at once.
        int[] sumsArray = new int[stride];
        Span<int> sums = sumsArray;
        for (int y = 0; y < coefficients.OutputSize; y++)
        {
            ReadOnlySpan<int> weights = coefficients.Weights(y);
            int start = coefficients.Start(y) - inputFirstRow;
            sums.Fill(RoundingBias);
            for (int i = 0; i < weights.Length; i++)
            {
                AccumulateRow(input.Slice((start + i) * stride, stride), weights[i], sums);
            }

            Span<byte> outputRow = output.Slice(y * stride, stride);
            for (int j = 0; j < stride; j++)
            {
                outputRow[j] = Clip8(sums[j]);
            }
        }
    }

    /// <summary>sums[j] += row[j] * weight for every j.</summary>
    private static void AccumulateRow(ReadOnlySpan<byte> row, int weight, Span<int> sums)
    {
        int j = 0;
        if (Vector.IsHardwareAccelerated && row.Length >= Vector<byte>.Count)
        {
            var weightVector = new Vector<int>(weight);
            Span<Vector<int>> sumVectors = MemoryMarshal.Cast<int, Vector<int>>(sums);
            int lastBlock = row.Length - Vector<byte>.Count;
            for (; j <= lastBlock; j += Vector<byte>.Count)
            {
                Vector.Widen(new Vector<byte>(row.Slice(j)), out Vector<ushort> low, out Vector<ushort> high);
                Vector.Widen(low, out Vector<uint> q0, out Vector<uint> q1);
                Vector.Widen(high, out Vector<uint> q2, out Vector<uint> q3);
                int block = j / Vector<int>.Count;
                sumVectors[block] += Vector.AsVectorInt32(q0) * weightVector;
                sumVectors[block + 1] += Vector.AsVectorInt32(q1) * weightVector;
                sumVectors[block + 2] += Vector.AsVectorInt32(q2) * weightVector;
                sumVectors[block + 3] += Vector.AsVectorInt32(q3) * weightVector;
            }
        }

        for (; j < row.Length; j++)
        {
            sums[j] += row[j] * weight;
        }
    }

    /// <summary>Pillow's clip8: drop the fraction bits (flooring) and clamp to a byte.</summary>
    private static byte Clip8(int sum)
    {
        int value = sum >> PrecisionBits;
        return (byte)(value < 0 ? 0 : value > 255 ? 255 : value);
    }

    /// <summary>Keys cubic convolution kernel with a = -0.5, evaluated in the same order as Pillow so doubles round the same.</summary>
    private static double BicubicKernel(double x)
    {
        const double a = -0.5;
        if (x < 0.0)
        {
            x = -x;
        }

        if (x < 1.0)
        {
            return ((a + 2.0) * x - (a + 3.0)) * x * x + 1;
        }

        if (x < 2.0)
        {
            return (((x - 5) * x + 8) * x - 4) * a;
        }

        return 0.0;
    }

    /// <summary>Per-output-position input window and fixed-point weights for one axis.</summary>
    private sealed class ResampleCoefficients
    {
        private readonly int _kernelSize;
        private readonly int[] _starts;
        private readonly int[] _counts;
        private readonly int[] _weights;

        private ResampleCoefficients(int outputSize, int kernelSize)
        {
            OutputSize = outputSize;
            _kernelSize = kernelSize;
            _starts = new int[outputSize];
            _counts = new int[outputSize];
            _weights = new int[checked(outputSize * kernelSize)];
        }

        public int OutputSize { get; }

        /// <summary>First input index read by any output position.</summary>
        public int FirstInputIndex => _starts[0];

        /// <summary>One past the last input index read, taken from the last output position as Pillow does.</summary>
        public int LastInputIndexExclusive => _starts[^1] + _counts[^1];

        public int Start(int outputIndex) => _starts[outputIndex];

        public ReadOnlySpan<int> Weights(int outputIndex) =>
            new(_weights, outputIndex * _kernelSize, _counts[outputIndex]);

        /// <summary>Pillow's precompute_coeffs followed by normalize_coeffs_8bpc, for the whole axis (no crop box).</summary>
        public static ResampleCoefficients ForBicubic(int inputSize, int outputSize)
        {
            // Pillow takes the box as floats; whole sizes below 2^24 convert exactly, so this is the same double.
            double scale = (double)inputSize / outputSize;
            double filterScale = Math.Max(scale, 1.0);
            double support = BicubicSupport * filterScale;
            int kernelSize = (int)Math.Ceiling(support) * 2 + 1;
            double inverseFilterScale = 1.0 / filterScale;

            var result = new ResampleCoefficients(outputSize, kernelSize);
            Span<double> weights = kernelSize <= 256 ? stackalloc double[kernelSize] : new double[kernelSize];
            for (int outputIndex = 0; outputIndex < outputSize; outputIndex++)
            {
                double center = (outputIndex + 0.5) * scale;
                // Truncating casts after + 0.5 round the window ends exactly as Pillow's C code does.
                int start = (int)(center - support + 0.5);
                if (start < 0)
                {
                    start = 0;
                }

                int end = (int)(center + support + 0.5);
                if (end > inputSize)
                {
                    end = inputSize;
                }

                int count = end - start;
                double total = 0.0;
                for (int i = 0; i < count; i++)
                {
                    double weight = BicubicKernel(((i + start) - center + 0.5) * inverseFilterScale);
                    weights[i] = weight;
                    total += weight;
                }

                Span<int> fixedWeights = result._weights.AsSpan(outputIndex * kernelSize, count);
                for (int i = 0; i < count; i++)
                {
                    double normalized = total != 0.0 ? weights[i] / total : weights[i];
                    // Round half away from zero, then truncate, as normalize_coeffs_8bpc does.
                    fixedWeights[i] = normalized < 0
                        ? (int)(-0.5 + normalized * (1 << PrecisionBits))
                        : (int)(0.5 + normalized * (1 << PrecisionBits));
                }

                result._starts[outputIndex] = start;
                result._counts[outputIndex] = count;
            }

            return result;
        }
    }
}
