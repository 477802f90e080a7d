using System.Text.Json;
using FsCheck;
using FsCheck.Xunit;
using PaliGemma.CpuOnly.Model.Tasks;
using Xunit.Abstractions;

namespace PaliGemma.CpuOnly.Tests.Tasks.Segmentation;

public sealed class MaskPlacementTests(ITestOutputHelper output)
{
    // Box floats come from our decoder's mask, which differs from PyTorch's by ~1e-6; only pixels whose reference value
    // is this close to 0 may legitimately threshold the other way (README: box_float_pixels_within_1em5_of_zero).
    private const float Tolerance = 1e-5f;

    public static TheoryData<int, int> Boxes()
    {
        var data = new TheoryData<int, int>();
        for (int c = 0; c < SegmentationGolden.CaseCount; c++)
        {
            int boxCount = SegmentationGolden.Case(c).GetProperty("boxes").GetArrayLength();
            for (int b = 0; b < boxCount; b++) data.Add(c, b);
        }
        return data;
    }

    private static JsonElement Box(int caseIndex, int boxIndex) => SegmentationGolden.Case(caseIndex).GetProperty("boxes")[boxIndex];

    private static PixelBox? PixelBoxOf(JsonElement box)
    {
        int[] loc = box.GetProperty("loc_y1x1y2x2").EnumerateArray().Select(e => e.GetInt32()).ToArray();
        return MaskPlacement.PixelBoxOf(loc, box.GetProperty("image_width").GetInt32(), box.GetProperty("image_height").GetInt32());
    }

    private static float[] ReferenceMask64(int caseIndex) =>
        SegmentationGolden.ReadNpy(SegmentationGolden.Case(caseIndex).GetProperty("mask64_file").GetString()!).ToFloat32();

    [Theory]
    [MemberData(nameof(Boxes))]
    public void PixelBoxOf_GoldenBox_MatchesTheEvaluator(int caseIndex, int boxIndex)
    {
        var box = Box(caseIndex, boxIndex);
        PixelBox? actual = PixelBoxOf(box);
        if (!box.GetProperty("valid").GetBoolean())
        {
            Assert.Null(actual);
            return;
        }

        int[] expected = box.GetProperty("pixel_box_x1y1x2y2").EnumerateArray().Select(e => e.GetInt32()).ToArray();
        Assert.Equal(new PixelBox(expected[0], expected[1], expected[2], expected[3]), actual);
        Assert.Equal(box.GetProperty("box_width").GetInt32(), actual!.Value.Width);
        Assert.Equal(box.GetProperty("box_height").GetInt32(), actual.Value.Height);
    }

    [Theory]
    [MemberData(nameof(Boxes))]
    public void BoxFloat_OfTheReferenceMask_IsBitExactWithPillow(int caseIndex, int boxIndex)
    {
        var box = Box(caseIndex, boxIndex);
        if (!box.TryGetProperty("box_float_file", out var file) || file.ValueKind != JsonValueKind.String) return;

        float[] actual = MaskPlacement.BoxFloat(ReferenceMask64(caseIndex), PixelBoxOf(box)!.Value);

        float[] expected = SegmentationGolden.ReadNpy(file.GetString()!).ToFloat32();
        Assert.Equal(expected.Select(BitConverter.SingleToInt32Bits), actual.Select(BitConverter.SingleToInt32Bits));
    }

    [Theory]
    [MemberData(nameof(Boxes))]
    public void DecodedMask_GoldenBox_MatchesBoxFloatBoxMaskAndFullMask(int caseIndex, int boxIndex)
    {
        var @case = SegmentationGolden.Case(caseIndex);
        var box = Box(caseIndex, boxIndex);
        int width = box.GetProperty("image_width").GetInt32(), height = box.GetProperty("image_height").GetInt32();
        float[] mask64 = SegmentationGolden.Decoder.Decode(SegmentationGolden.Codes(@case));
        PixelBox? pixelBox = PixelBoxOf(box);

        var fullReference = SegmentationGolden.ReadNpy(box.GetProperty("full_mask_file").GetString()!);
        Assert.Equal([(long)height, width], fullReference.Shape);
        byte[] expectedFull = fullReference.ToUInt8();
        byte[] actualFull = MaskPlacement.FullMask(mask64, pixelBox, width, height);
        Assert.Equal(box.GetProperty("full_true_pixels").GetInt32(), expectedFull.Count(v => v != 0));

        if (!box.GetProperty("valid").GetBoolean())
        {
            Assert.Null(pixelBox);
            Assert.Equal(expectedFull, actualFull);
            Assert.All(actualFull, v => Assert.Equal(0, v));
            return;
        }

        PixelBox b = pixelBox!.Value;
        float[] expectedFloat = SegmentationGolden.ReadNpy(box.GetProperty("box_float_file").GetString()!).ToFloat32();
        byte[] expectedMask = SegmentationGolden.ReadNpy(box.GetProperty("box_mask_file").GetString()!).ToUInt8();
        float[] actualFloat = MaskPlacement.BoxFloat(mask64, b);
        Assert.Equal(b.Width * b.Height, actualFloat.Length);
        Assert.Equal(expectedFloat.Length, actualFloat.Length);

        float maxDiff = 0;
        int nearZero = 0, flipped = 0;
        for (int i = 0; i < expectedFloat.Length; i++)
        {
            maxDiff = Math.Max(maxDiff, Math.Abs(actualFloat[i] - expectedFloat[i]));
            bool tie = Math.Abs(expectedFloat[i]) <= Tolerance;
            if (tie) nearZero++;
            byte actualBit = actualFloat[i] > 0f ? (byte)1 : (byte)0;
            if (actualBit != expectedMask[i])
            {
                Assert.True(tie, $"box pixel {i}: reference {expectedFloat[i]} is not within {Tolerance} of 0 but the masks differ");
                flipped++;
            }
        }
        output.WriteLine($"{@case.GetProperty("name").GetString()} / {box.GetProperty("label").GetString()}: box float max |diff| = {maxDiff:E3}, near-zero pixels {nearZero}, flipped {flipped}");
        Assert.True(maxDiff <= Tolerance, $"box float max |diff| {maxDiff:E3} exceeds {Tolerance:E0}");
        Assert.Equal(box.GetProperty("box_float_pixels_within_1em5_of_zero").GetInt32(), nearZero);

        // The full mask is the box mask pasted at (X1, Y1) and zero elsewhere.
        for (int y = 0; y < height; y++)
        {
            for (int x = 0; x < width; x++)
            {
                int i = y * width + x;
                bool inside = x >= b.X1 && x < b.X2 && y >= b.Y1 && y < b.Y2;
                if (actualFull[i] == expectedFull[i]) continue;
                Assert.True(inside && Math.Abs(expectedFloat[(y - b.Y1) * b.Width + (x - b.X1)]) <= Tolerance,
                    $"full mask pixel ({x}, {y}) differs away from a near-zero box value");
            }
        }
    }

    [Fact]
    public void PixelBoxOf_DividesBy1023BeforeMultiplying()
    {
        // (87 / 1023.0) * 341 = 28.999999999999996 truncates to 28; 87 * 341 / 1023 is exactly 29.
        Assert.Equal(new PixelBox(28, 0, 341, 48), MaskPlacement.PixelBoxOf([0, 87, 1023, 1023], 341, 48));
    }

    [Fact]
    public void PixelBoxOf_EmptyInTokensOrPixels_IsNull()
    {
        Assert.Null(MaskPlacement.PixelBoxOf([10, 10, 10, 20], 100, 100));
        Assert.Null(MaskPlacement.PixelBoxOf([10, 20, 30, 19], 100, 100));
        Assert.Null(MaskPlacement.PixelBoxOf([100, 100, 1000, 170], 12, 9));
        Assert.NotNull(MaskPlacement.PixelBoxOf([0, 0, 1023, 1023], 1, 1));
    }

    [Fact]
    public void PixelBoxOf_BadArguments_Throw()
    {
        Assert.Throws<ArgumentException>(() => MaskPlacement.PixelBoxOf([1, 2, 3], 10, 10));
        Assert.Throws<ArgumentException>(() => MaskPlacement.PixelBoxOf([0, 0, 1024, 10], 10, 10));
        Assert.Throws<ArgumentException>(() => MaskPlacement.PixelBoxOf([-1, 0, 5, 10], 10, 10));
        Assert.Throws<ArgumentOutOfRangeException>(() => MaskPlacement.PixelBoxOf([0, 0, 5, 10], 0, 10));
    }

    [Fact]
    public void FullMask_BoxPartlyOutsideTheImage_IsClipped()
    {
        float[] mask64 = ReferenceMask64(2);
        var box = new PixelBox(-5, 3, 20, 40);
        byte[] full = MaskPlacement.FullMask(mask64, box, 16, 30);
        float[] boxFloat = MaskPlacement.BoxFloat(mask64, box);
        for (int y = 0; y < 30; y++)
        {
            for (int x = 0; x < 16; x++)
            {
                byte expected = y >= 3 && boxFloat[(y - 3) * box.Width + x + 5] > 0f ? (byte)1 : (byte)0;
                Assert.Equal(expected, full[y * 16 + x]);
            }
        }
    }

    [Fact]
    public void FullMask_NullBox_IsAllZero()
    {
        Assert.All(MaskPlacement.FullMask(ReferenceMask64(0), null, 7, 5), v => Assert.Equal(0, v));
    }

    [Fact]
    public void BoxFloatAndFullMask_BadArguments_Throw()
    {
        float[] mask64 = new float[4096];
        Assert.Throws<ArgumentException>(() => MaskPlacement.BoxFloat(new float[4095], new PixelBox(0, 0, 2, 2)));
        Assert.Throws<ArgumentException>(() => MaskPlacement.BoxFloat(mask64, new PixelBox(2, 0, 2, 2)));
        Assert.Throws<ArgumentException>(() => MaskPlacement.FullMask(new float[10], null, 2, 2));
        Assert.Throws<ArgumentException>(() => MaskPlacement.ResizeBilinear(new float[5], 2, 3, 4, 4));
        Assert.Throws<ArgumentOutOfRangeException>(() => MaskPlacement.ResizeBilinear(new float[6], 2, 3, 0, 4));
    }

    [Property(MaxTest = 100)]
    public bool ResizeBilinear_KeepsAConstantImageConstant(PositiveInt sourceWidth, PositiveInt sourceHeight, PositiveInt width, PositiveInt height, float value)
    {
        // Each output's weights sum to 1 within a few double ulps, far too little to move a float32 value.
        float constant = float.IsFinite(value) ? value : -0.75f;
        int sw = sourceWidth.Get % 90 + 1, sh = sourceHeight.Get % 90 + 1, w = width.Get % 300 + 1, h = height.Get % 300 + 1;
        float[] source = Enumerable.Repeat(constant, sw * sh).ToArray();
        float[] resized = MaskPlacement.ResizeBilinear(source, sw, sh, w, h);
        return resized.Length == w * h && resized.All(v => v == constant);
    }

    [Property(MaxTest = 100)]
    public bool ResizeBilinear_ToTheSameSize_IsACopy(PositiveInt width, PositiveInt height, int seed)
    {
        int w = width.Get % 70 + 1, h = height.Get % 70 + 1;
        var random = new Random(seed);
        float[] source = Enumerable.Range(0, w * h).Select(_ => (float)(random.NextDouble() * 4 - 2)).ToArray();
        float[] resized = MaskPlacement.ResizeBilinear(source, w, h, w, h);
        return !ReferenceEquals(source, resized) && resized.SequenceEqual(source);
    }

    [Fact]
    public void ResizeBilinear_Upscale2x_InterpolatesBetweenCenters()
    {
        // 1-D check of the pixel-center convention: output i samples (i + 0.5) / 2 - 0.5 in input coordinates.
        float[] resized = MaskPlacement.ResizeBilinear([0f, 4f], 2, 1, 4, 1);
        Assert.Equal([0f, 1f, 3f, 4f], resized);
    }
}
